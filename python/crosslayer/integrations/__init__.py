"""Drop-in acceleration of third-party cross-layer-connection packages.

    crosslayer.integrations.hyper_connections   lucidrains' `hyper-connections` (PyPI):
                                                `accelerate(model)` runs its
                                                HyperConnections modules on crosslayer.ops
    crosslayer.integrations.transformers        Hugging Face transformers' DeepSeek-V4:
                                                `accelerate(model)` runs its mHC
                                                connections on crosslayer.ops

Each integration module imports its package when it is itself imported, so
`import crosslayer` never needs those packages installed.
"""
