"""The operator's say over node classes: refused outright, or trusted with any string.

Custom nodes that take a file path as a plain string (resolved against ComfyUI's working
directory, so `output/x.png` is everyone's output) cannot be confined by names: they are
refused by default. `BROKER_FILE_NODES_DENY` replaces that list; `BROKER_FILE_NODES_ALLOW`
names classes whose inputs are not checked at all (only for nodes the operator trusts).
"""

from __future__ import annotations

from dataclasses import dataclass

# Well-known custom nodes that read any path they are given.
DEFAULT_DENY = frozenset({
    "Image Load",  # WAS Node Suite: image_path
    "Load Image Batch",  # WAS Node Suite: path
    "Load Text File",  # WAS Node Suite: file_path
    "VHS_LoadVideoPath",  # Video Helper Suite: video
    "VHS_LoadVideoFFmpegPath",
    "VHS_LoadImagesPath",  # Video Helper Suite: directory
    "VHS_LoadAudio",  # Video Helper Suite: audio_file
    "LoadImagesFromDir //Inspire",
    "LoadImageListFromDir //Inspire",
    "LoadImageFromPath",
})  # fmt: skip


def class_list(value: str | None) -> frozenset[str]:
    """A comma-separated setting as a set of class names."""
    return frozenset(name.strip() for name in (value or "").split(",") if name.strip())


@dataclass(frozen=True)
class FilePolicy:
    deny: frozenset[str] = DEFAULT_DENY
    allow: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, deny: str | None, allow: str | None) -> FilePolicy:
        return cls(DEFAULT_DENY if deny is None else class_list(deny), class_list(allow))

    def denies(self, class_type: str) -> bool:
        return class_type in self.deny

    def trusts(self, class_type: str) -> bool:
        return class_type in self.allow and class_type not in self.deny
