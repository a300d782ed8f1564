"""Other systems' model formats: Hugging Face export (hf) and import (hf_import)."""
