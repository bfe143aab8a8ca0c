# Crier's container image: `docker build -t crier .` then `docker run -p 8080:8080 crier`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin crier

FROM debian:bookworm-slim
COPY --from=build /src/target/release/crier /usr/local/bin/crier
ENV CRIER_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER nobody
ENTRYPOINT ["/usr/local/bin/crier"]
