"""The supervisor's control plane over HTTP: admin API, Prometheus metrics and the dashboard."""
