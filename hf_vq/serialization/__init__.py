"""What is written to disk and how it is read back: the one state-dict builder, validator and loader that
`load_compressed_`, the timm integration and the transformers integration all call. No Hugging Face imports."""

from .checksum import CHECKSUMS_KEY, VERIFY_ENV, ChecksumError, checksums_json, verify_enabled
from .folder import (MANIFEST_NAME, SaveTargetError, atomic_folder, check_save_target, check_writable, owned_files,
                     save_weights)
from .format import (CODEBOOKS, CODES, INDEX_NAME, SAFETENSORS_DTYPES, SCALES, WEIGHTS_NAME, CheckpointError,
                     expected_tensors, find_shared_key, is_shared_codebooks_key, metadata_for)
from .load import assign_tensors_, load_compressed_, read_checkpoint, read_files
from .pin import PinnedFolder, shown
from .read import (check_same_save, load_weights, read_config_json, read_header, read_quantization_config, record_of,
                   verify_files, weight_files)
from .size import LayerSize, SizeReport, checkpoint_size_report, size_report
from .state_dict import disk_state_dict, storage_groups
from .validate import check_codes, check_entries, check_state_dict, check_stored_tensors, check_unlisted

__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "CODES", "CODEBOOKS", "SCALES", "SAFETENSORS_DTYPES", "CheckpointError",
           "ChecksumError", "SaveTargetError", "CHECKSUMS_KEY", "VERIFY_ENV", "MANIFEST_NAME", "checksums_json",
           "verify_enabled", "expected_tensors", "find_shared_key", "is_shared_codebooks_key", "metadata_for",
           "atomic_folder", "check_save_target", "check_writable", "owned_files", "save_weights", "assign_tensors_",
           "load_compressed_", "read_checkpoint", "read_files", "PinnedFolder", "shown", "check_same_save",
           "load_weights", "read_config_json", "read_header", "read_quantization_config", "record_of", "verify_files",
           "weight_files", "LayerSize", "SizeReport", "checkpoint_size_report", "size_report", "disk_state_dict",
           "storage_groups", "check_codes", "check_entries", "check_state_dict", "check_stored_tensors",
           "check_unlisted"]
