//! CLIP towers with OpenCLIP's shapes and parameter names (in progress).
