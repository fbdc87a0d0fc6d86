"""Stand-in for `PythonSlicer`, the CTKAppLauncher that is `sys.executable` inside Slicer.

As `ctkAppLauncherInternal::runProcess` (commontk/AppLauncher, `Base/ctkAppLauncher.cpp`): the real
Python runs as a child (`QProcess` with `ForwardedChannels`: stdout/stderr pass through, the child's
stdin is a pipe of the launcher's own), the launcher waits for it and exits with its code, and it
installs no signal handlers, so SIGTERM ends the launcher alone and the child keeps running.

    python launcher.py -m medmllm.cli serve ...
"""

from __future__ import annotations

import subprocess
import sys

if __name__ == "__main__":
    child = subprocess.Popen([sys.executable, *sys.argv[1:]], stdin=subprocess.PIPE)
    sys.exit(child.wait())
