"""The edge agent: records cameras into segments, seals them into a signed journal, uploads them."""
