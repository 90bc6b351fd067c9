"""Image layers without extraction (issue 23, in progress).

A lower layer may be an OCI layer blob (a tar, tar+gzip or tar+zstd
file). At the first mount the blob is read once and turned into a
*skeleton* in a cache dir keyed by the blob's digest: the layer's tree
with every entry's metadata (owner, mode, times, xattrs, links, devices,
the OCI whiteouts as the kernel's) and regular files of the right size
holding no data, beside an index of where each file's data lie in the
uncompressed stream (and, for gzip, the decompression checkpoints that
make a read at any offset cheap). The core serves the skeleton as an
ordinary lower dir; before it reads the data of one of its files (open,
copy-up) it asks the layer's provider (BlobLayer.ensure), which writes
that file's data into the skeleton file from the blob. Later mounts reuse
skeleton and index; an index that does not match its blob or skeleton is
rebuilt, never trusted.

Modules: blob (formats, sequential and random access), layer (BlobLayer:
the cache, the skeleton, ensure).
"""
