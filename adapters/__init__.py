"""After training: read a saved adapter, check it against a serving stack, convert it to plain LoRA, or merge it.

`check_adapter` says whether a stack loads the adapter as it is (with the launch flags) or what to do instead;
`convert_adapter` and `merge_adapter` carry out the "convert" and "merge" routes with PEFT's own tools.
"""

from peftpick.adapters.convert import Conversion, LayerConversion, convert_adapter, export_adapter, method_label
from peftpick.adapters.files import SavedAdapter, TensorInfo, read_adapter, read_adapter_config
from peftpick.adapters.formats import WrittenAdapter, to_diffusers_format, to_kohya_format
from peftpick.adapters.merge import Merge, merge_adapter

__all__ = [
    "Conversion",
    "LayerConversion",
    "Merge",
    "SavedAdapter",
    "TensorInfo",
    "WrittenAdapter",
    "convert_adapter",
    "export_adapter",
    "merge_adapter",
    "method_label",
    "read_adapter",
    "read_adapter_config",
    "to_diffusers_format",
    "to_kohya_format",
]
