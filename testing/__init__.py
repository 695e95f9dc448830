"""Test doubles and fixtures shared by the tests, benches and experiments: the fault-injecting judge server and the
tiny random model. The roles (actors/, reward/, learner/, cluster/) never import this package."""
