"""The science: EDM preconditioning and sampling, networks, loss families, init schemes, the one
training loop, data, metrics, NVIDIA's EDM import. Torch only: no Ray, no YAML."""
