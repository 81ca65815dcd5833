"""The layered structure holds at run time: the pure layers import nothing of the Hugging Face stack, and
`import hf_vq` registers with transformers and timm without importing either (tested in fresh interpreters)."""

import subprocess
import sys

import pytest

HF = ("transformers", "timm", "huggingface_hub")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(','.join(m for m in {HF!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return set(filter(None, out.split(",")))


@pytest.mark.parametrize("module", ["hf_vq", "hf_vq.codec", "hf_vq.config", "hf_vq.calibrate", "hf_vq.graph",
                                    "hf_vq.nn", "hf_vq.pipeline", "hf_vq.serialization"])
def test_pure_layers_import_no_hugging_face_library(module):
    assert _imported_after(f"import {module}") == set()


def test_quantize_a_plain_module_without_the_hugging_face_stack():
    statement = ("import torch, hf_vq; m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), "
                 "torch.nn.Linear(32, 8)); hf_vq.quantize_(m, hf_vq.VQConfig(k=16, n_iter=2), progress=False); "
                 "m(torch.randn(2, 16))")
    assert _imported_after(statement) == set()


def test_registration_follows_the_import_of_transformers():
    code = ("import hf_vq, transformers; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, "
            "AUTO_QUANTIZATION_CONFIG_MAPPING; print(AUTO_QUANTIZER_MAPPING['hf_vq'].__name__, "
            "AUTO_QUANTIZATION_CONFIG_MAPPING['hf_vq'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["HfVQQuantizer", "TransformersVQConfig"]
