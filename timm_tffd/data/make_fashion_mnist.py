"""Build the embedded Fashion-MNIST subset (``fashion_mnist_small.npz``) from the official IDX files.

Source: Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), which installs the
four official files in /usr/share/datasets/fashion-mnist/. Fashion-MNIST is (c) Zalando SE, MIT licence.

The subset is class-balanced and deterministic: the first ``--train-per-class`` images of each class from the official
training split, and the first ``--val-per-class`` of each class from the official test split, in file order.

    python -m timm_tffd.data.make_fashion_mnist [--src DIR] [--out FILE]
"""
import argparse
import gzip
import os

import numpy as np

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
DEFAULT_SRC = '/usr/share/datasets/fashion-mnist'


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte IDX file')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(src: str, split: str):
    prefix = 'train' if split == 'train' else 't10k'
    images = read_idx(os.path.join(src, f'{prefix}-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(src, f'{prefix}-labels-idx1-ubyte.gz'))
    return images, labels


def balanced_subset(images: np.ndarray, labels: np.ndarray, per_class: int):
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    keep.sort()
    return images[keep], labels[keep]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--src', default=DEFAULT_SRC, help='folder with the four official .gz IDX files')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'fashion_mnist_small.npz'))
    parser.add_argument('--train-per-class', type=int, default=400)
    parser.add_argument('--val-per-class', type=int, default=100)
    args = parser.parse_args()
    tr_x, tr_y = balanced_subset(*load_split(args.src, 'train'), args.train_per_class)
    va_x, va_y = balanced_subset(*load_split(args.src, 'test'), args.val_per_class)
    np.savez_compressed(args.out, train_images=tr_x, train_labels=tr_y, val_images=va_x, val_labels=va_y,
                        classes=np.array(CLASSES))
    print(f'wrote {args.out}: train {tr_x.shape}, val {va_x.shape}')


if __name__ == '__main__':
    main()
