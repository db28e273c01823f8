"""Models behind one interface (`Model`), built by name from a config (`registry.build`).

Importing this package registers every built-in model: the LLaMA family (`llama`), the
SmolLM2-135M loader (`smollm2`) and its MoEfied version (`moefy`), the MoE decoder (`moe`),
the Flax NNX examples and the iDisc depth model (`idisc`).
"""

from zojax.models import idisc, llama, moe, moefy, nnx_examples, smollm2  # noqa: F401  (register)
from zojax.models.flax_adapter import from_flax
from zojax.models.interface import Model, from_block_model
from zojax.models.protocol import BlockModel
from zojax.models.registry import build, names, register

__all__ = ["BlockModel", "Model", "build", "from_block_model", "from_flax", "names", "register"]
