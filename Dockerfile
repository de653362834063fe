# One image, every role: the command picks it (serve, worker, exchange-sim, ...).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY lua ./lua
COPY openapi.yaml ./
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --no-create-home tally
COPY --from=build /src/target/release/tally /usr/local/bin/tally
USER tally
ENV TALLY_LOG_FORMAT=json
ENTRYPOINT ["tally"]
CMD ["serve"]
