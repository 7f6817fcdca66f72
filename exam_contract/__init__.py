"""The edge/collector contract: manifests, canonical JSON, signing, hash chain, topics, messages.

Both `edge_agent` and `collector` import this package; neither imports the other.
"""

PROTOCOL_VERSION = 1
