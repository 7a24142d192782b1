"""serve-controller: goal state, replica lifecycle and replica-set publication."""
