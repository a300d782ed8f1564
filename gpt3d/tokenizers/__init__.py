"""Tokenizers: Megatron's tokenizer types behind one interface (base), Hugging Face tokenizer.json (huggingface),
SentencePiece (sentencepiece), tokenizer files for export/import (files), behaviour fingerprints (fingerprint),
and the check of a corpus' token ids against a vocabulary (vocab_check)."""
