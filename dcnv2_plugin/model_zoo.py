"""The configs that ship with the package, found by name as detectron2's
`model_zoo.get_config_file` finds its own.

    from dcnv2_plugin.model_zoo import get_config_file
    cfg.merge_from_file(get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_mdconv_c3-c5_mdpool.yaml"))
"""

from pathlib import Path
from typing import List, Union

# In a checkout this is a link to the repository's configs/; an installed
# package holds a copy.
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def list_configs() -> List[str]:
    """Names of the packaged configs, e.g. "demo/dcnv2.yaml"."""
    return sorted(str(path.relative_to(CONFIG_ROOT)) for path in CONFIG_ROOT.rglob("*.yaml"))


def get_config_file(name_or_path: Union[str, Path]) -> str:
    """The path of a config file: `name_or_path` itself when it is an existing
    file, else the packaged config of that name (relative to configs/, with
    or without a leading "configs/")."""
    path = Path(name_or_path)
    if path.is_file():
        return str(path)
    name = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    packaged = CONFIG_ROOT / name
    if packaged.is_file():
        return str(packaged)
    raise FileNotFoundError(
        f"no config file {str(name_or_path)!r}: it is neither an existing file nor a packaged config. "
        f"Packaged configs: {', '.join(list_configs())}"
    )
