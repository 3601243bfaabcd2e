//! Tessera's shared vocabulary. Every other crate speaks through this one:
//! resource names and annotation keys, the node-inventory and pod-allocation
//! codecs (HAMi-compatible), Kubernetes quantity parsing, the pod request
//! model, the config file and the typed errors. Nothing here does I/O.
