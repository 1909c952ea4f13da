"""Weight offload under a GPU memory budget (FlexInfer's ideas on CUDA streams).

``policy`` decides where each layer's tensor groups live, ``placement`` holds what
it reads and returns (both torch-free, so this package imports nothing at the top:
the policy stays importable without torch);
``ring``, ``streams``, ``prefetcher`` and ``weights`` build and run the result.
"""
