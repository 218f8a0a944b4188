"""Bridges to other libraries, each behind its own extra: ``pagedkv.integrations.transformers``
needs ``pip install "pagedkv[hf]"``. ``import pagedkv`` imports none of them."""
