# The sidecar as a container image: a static binary, nothing else, run as an
# unprivileged user with no capabilities needed. Build with `make image`,
# which compiles the static binary first (no base image is pulled).
FROM scratch
COPY sfkit-proxy /sfkit-proxy
USER 65534:65534
EXPOSE 1080/tcp
ENTRYPOINT ["/sfkit-proxy"]
