"""Builds mxnet-compat-hook: the package, a copy of ../plugins/compat.py in it, and the .pth file
that site-packages runs at start-up (put beside the package, as setuptools does for its own)."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithCompat(build_py):
    def run(self):
        super().run()
        shutil.copyfile(os.path.join(HERE, "..", "plugins", "compat.py"),
                        os.path.join(self.build_lib, "mxnet_compat_hook", "compat.py"))
        shutil.copyfile(os.path.join(HERE, "mxnet_compat_hook.pth"), os.path.join(self.build_lib, "mxnet_compat_hook.pth"))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, "mxnet_compat_hook", "compat.py"),
            os.path.join(self.build_lib, "mxnet_compat_hook.pth")]


setup(cmdclass={"build_py": BuildWithCompat})
