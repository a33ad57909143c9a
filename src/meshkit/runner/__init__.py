"""Run modes: a system of services in one process (monolith) or one process per instance (processes).

``meshkit run FOLDER [--mode monolith|processes] [--replicas name=N]`` is the command line over this package;
:func:`load_system` reads the folder's ``meshkit.toml``, :func:`run_monolith` and :class:`Supervisor` run it.
The same services run either way without a code change (docs/runtime.md).
"""

from meshkit.runner.edge import dev_token, front_gateway, gateway_config
from meshkit.runner.monolith import Ready, run_monolith
from meshkit.runner.processes import Supervisor
from meshkit.runner.system import Mode, System, load_system

__all__ = [
    "Mode",
    "Ready",
    "Supervisor",
    "System",
    "dev_token",
    "front_gateway",
    "gateway_config",
    "load_system",
    "run_monolith",
]
