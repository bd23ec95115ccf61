//! Test infrastructure: guest image discovery, VM builders, leak checks.
