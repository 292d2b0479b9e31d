"""Where the repository is. A leaf module (it imports nothing from diffbias), so that any module can know the
checkout's root without importing the config (``io`` runs ``git`` there; ``config`` finds the schema there)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
