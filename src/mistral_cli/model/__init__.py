"""The network and everything that describes or fills it: its config, the transformer's math, the key/value
cache, quantized layers, device placement and checkpoint loading."""
