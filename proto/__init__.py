"""Generated gRPC/protobuf code for package expertplane.v1 (see expertplane.proto; never edit *_pb2*.py)."""
