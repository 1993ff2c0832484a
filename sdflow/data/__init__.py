"""The data side: sources, the image pipeline, the network guard, filters, captioners, buckets and the
dataset report."""
