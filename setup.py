"""Package-dir mapping for vlm-core: core/ is `vlm`, kernels/ is `vlm.kernels`.

Packages are listed with find_packages over each mapped directory, so a subpackage added
later is in the wheel without anyone remembering to list it (editable installs hide that
mistake; tests/test_packaging.py builds the wheel to catch it).
"""

from setuptools import find_packages, setup


def mapped_packages(root: str, directory: str) -> tuple[list[str], dict[str, str]]:
    subpackages = find_packages(directory)
    packages = [root] + [f"{root}.{sub}" for sub in subpackages]
    package_dir = {root: directory}
    package_dir.update({f"{root}.{sub}": f"{directory}/{sub.replace('.', '/')}" for sub in subpackages})
    return packages, package_dir


core_packages, core_dirs = mapped_packages("vlm", "core")
kernel_packages, kernel_dirs = mapped_packages("vlm.kernels", "kernels")

setup(packages=core_packages + kernel_packages, package_dir={**core_dirs, **kernel_dirs})
