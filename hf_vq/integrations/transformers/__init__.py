"""transformers integration: `import hf_vq` makes the plain transformers API compress, load and save VQ models.

```python
>>> import hf_vq
>>> from transformers import AutoModel
>>> model = AutoModel.from_pretrained("org/dense", quantization_config=hf_vq.VQConfig(k=256))  # compress on load
>>> model.save_pretrained("dense-vq")             # config.json + quantization_config, safetensors, model card
>>> model = AutoModel.from_pretrained("dense-vq")  # rebuilds the VQ modules, loads codes and codebooks
>>> dense = model.dequantize()                     # back to nn.Linear / nn.Embedding
```

[`load_dense`] and [`save_compressed`] are what the CLI needs on top (any architecture; a complete folder with
tokenizer files and a card with fidelity figures).
"""

from .config import TransformersVQConfig
from .layers import VQConv1D
from .loading import GUARD_NOTE_KEY, check_checkpoint_files, load_tensors_
from .quantizer import QUANT_METHOD, HfVQQuantizer, attach_, detach_, register
from .saving import load_dense, save_compressed

__all__ = ["HfVQQuantizer", "TransformersVQConfig", "VQConv1D", "QUANT_METHOD", "GUARD_NOTE_KEY", "register",
           "attach_", "detach_", "check_checkpoint_files", "load_tensors_", "load_dense", "save_compressed"]

register()  # importing the integration registers it (idempotent)
