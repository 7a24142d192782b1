"""serve-replica: hosts one instance of a user deployment behind a gRPC servicer."""
