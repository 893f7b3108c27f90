"""The network: the sans-IO frame format (:mod:`.wire`), mutually authenticated
multiplexed connections (:mod:`.transport`, :mod:`.tls`) and files over streams (:mod:`.streams`)."""
