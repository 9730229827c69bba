# The sidecar as a container image: a static binary, nothing else, run as an
# unprivileged user with no capabilities needed. Build with `make image`,
# which compiles the static binary first (no base image is pulled).
# /state is there, owned by that user, so that a named volume mounted on it
# (docker run -v sfkit-state:/state) starts out writable by it; the build
# context holds an empty state/ directory beside the binary.
FROM scratch
COPY sfkit-proxy /sfkit-proxy
COPY --chown=65534:65534 state /state
USER 65534:65534
ENTRYPOINT ["/sfkit-proxy"]
