from setuptools import find_packages, setup

setup(
    name="mpidd",
    version="0.1.0",
    description="Domain-decomposition training of image classifiers on MPI (two-level CNN-DNN)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib
    packages=find_packages(include=["mpidd", "mpidd.*", "data_prep", "data_prep.*"]),
    install_requires=[
        "torch==2.13.0",
        "mpi4py>=4.0",  # needs an MPI: the `mpich` extra (pip), or the system's (make MPI=system)
        "h5py>=3.8",
        "numpy>=1.24",
        "pillow>=9",  # mpidd.predict reads PNG/JPEG images
        "matplotlib>=3.7",  # mpidd.report --out draws its figures
    ],
    extras_require={
        # data_prep's converters: nibabel reads NIfTI volumes; scikit-image ships lfw_subset and sample photos
        "data": ["nibabel>=5", "scikit-image>=0.22"],
        # scikit-learn: its bundled real `digits` for tests
        "test": ["pytest>=7", "pytest-mpi>=0.6", "scikit-learn>=1.3", "nibabel>=5", "scikit-image>=0.22",
                 "ruff>=0.5"],  # ruff: the lint suite (ruff.toml)
        "mpich": ["mpich"],  # MPI from pip (make's default, MPI=pip); leave it out for a site MPI
    },
)
