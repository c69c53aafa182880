"""Bundle layout on disk: `STORE/NAME/<version>/` with `manifest.json`, written atomically."""

from model_store.integrity import HashCache, sha256_file
from model_store.manifest import FORMAT_VERSION, ComponentEntry, FileEntry, Manifest, ManifestError
from model_store.store import BundleRef, Store

__all__ = [
    "FORMAT_VERSION", "BundleRef", "HashCache", "ComponentEntry", "FileEntry", "Manifest", "ManifestError", "Store", "sha256_file",
]
