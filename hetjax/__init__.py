"""hetjax: keep training residuals in host memory, fetch them back just in time."""

from importlib.metadata import PackageNotFoundError, version

from ._api import het_offload as het_offload
from ._compile import CompiledMemory as CompiledMemory
from ._compile import compile_for as compile_for
from ._compile import compiled_memory as compiled_memory
from ._cost import DeviceProfile as DeviceProfile
from ._cost import measure_device as measure_device
from ._plan import HetjaxWarning as HetjaxWarning
from ._plan import Plan as Plan
from ._report import Report as Report
from ._report import analyze as analyze
from ._simulate import CopyTiming as CopyTiming
from ._simulate import StepEstimate as StepEstimate
from ._simulate import simulate_step as simulate_step
from ._target import target_devices as target_devices
from ._target import target_names as target_names
from ._usage import ResidualUsage as ResidualUsage

try:
    __version__ = version("hetjax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
