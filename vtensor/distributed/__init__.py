"""vtensor.distributed: the tensor-parallel group over ``torch.distributed``.

Nothing here is home-made: collectives are ``torch.distributed``'s (NCCL on
GPUs, gloo on CPUs), processes are ``torch.multiprocessing`` ``spawn`` children
or torchrun's, and the rendezvous is a ``TCPStore``. It knows nothing of models
or engines: ``models`` shards its layers over a :class:`TPGroup`, ``engine``
starts the ranks and sends them each step's plan.
"""

from .group import TPGroup
from .launch import LaunchSpec, multicast_off
from .procs import WorkerDiedError

__all__ = ["LaunchSpec", "TPGroup", "WorkerDiedError", "multicast_off"]
