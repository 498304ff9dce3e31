"""The data path: where rows are read (sources, reader) and batches built (batches, features,
vocabulary). Import the modules themselves, e.g. `from recsys.data.reader import open_split`."""
