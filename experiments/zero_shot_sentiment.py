"""Why is SmolLM2-135M's zero-shot accuracy near chance? Bias versus signal in the prompt.

  python experiments/zero_shot_sentiment.py

Scores the fixed 1000-sentence test split with the cloze prompt ("<s> It was" ->
" terrible" / " great") and reports: accuracy, the share predicted positive (label-word
bias), the ROC AUC of the logit margin (signal that a threshold could use, bias aside), and
the accuracy with the threshold set to the margin's median on the k=16 dev sample (a
cheap calibration that reads the 32 dev sentences' margins, not their labels). Writes
experiments/results/zero_shot_sentiment.{json,png}; prints a final JSON line.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zojax.data import batching, sentiment  # noqa: E402
from zojax.data.tokenizer import smollm2_tokenizer  # noqa: E402
from zojax.models import llama, smollm2  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def margins(config, params, encoded, batch_size=32):
  """logit(" great") - logit(" terrible") per example."""
  @jax.jit
  def score(params, batch):
    h = llama.final_hidden(config, params, batch["tokens"])
    logits = llama.candidate_logits(config, params, h, batch)
    return logits[:, 1] - logits[:, 0]

  out = []
  for batch in batching.eval_batches(encoded, batch_size):
    m = np.asarray(score(params, batch))
    out.append(m[batch["weight"] > 0])
  return np.concatenate(out)


def roc_auc(scores, labels):
  """P(score of a random positive > score of a random negative), ties counted half."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  greater = (pos[:, None] > neg[None, :]).mean()
  ties = (pos[:, None] == neg[None, :]).mean()
  return float(greater + 0.5 * ties)


def main():
  config, params = smollm2.load_smollm2()
  tok = smollm2_tokenizer()
  data = sentiment.kshot(sentiment.sentiment_splits(0), k=16, seed=0)
  enc = {name: sentiment.encode_prompts(tok, getattr(data, name), max_len=64, pad_id=0)
         for name in ("dev", "test")}
  m_test, y_test = margins(config, params, enc["test"]), enc["test"]["label"]
  m_dev = margins(config, params, enc["dev"])
  threshold = float(np.median(m_dev))
  summary = {
      "test_accuracy": float(((m_test > 0) == y_test).mean()),
      "predicted_positive_share": float((m_test > 0).mean()),
      "true_positive_share": float(y_test.mean()),
      "margin_roc_auc": roc_auc(m_test, y_test),
      "dev_median_threshold": threshold,
      "test_accuracy_dev_median_threshold": float(((m_test > threshold) == y_test).mean()),
      "test_size": int(len(y_test)),
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "zero_shot_sentiment.json").write_text(json.dumps(summary, indent=2) + "\n")
  fig, ax = plt.subplots(figsize=(6, 3.5))
  bins = np.linspace(m_test.min(), m_test.max(), 40)
  for label, name in ((0, "negative"), (1, "positive")):
    ax.hist(m_test[y_test == label], bins=bins, alpha=0.6, label=name)
  ax.axvline(0, c="k", lw=0.8, label="argmax threshold")
  ax.axvline(threshold, c="r", ls="--", lw=0.8, label="dev-median threshold")
  ax.set_xlabel("logit(' great') - logit(' terrible')")
  ax.set_title(f"SmolLM2-135M zero-shot, AUC {summary['margin_roc_auc']:.3f}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(RESULTS / "zero_shot_sentiment.png", dpi=110)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
