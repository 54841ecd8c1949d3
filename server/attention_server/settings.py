"""Server settings: one class, read from ATTENTION_* environment variables and
from `attention-server` flags (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATTENTION_",
        cli_prog_name="attention-server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        use_attribute_docstrings=True,
        extra="ignore",
    )

    host: str = "[::]"
    """Address to bind."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port (attention.v1, health, reflection). 0 picks a free port."""
    model_repository: Path = Path("models/repository")
    """Folder with one sub-folder per exported model (model.json, model.onnx, tokenizer.json)."""
    models: list[str] = []
    """Models to load from the repository; empty loads every model folder found."""
    default_model: str = "minilm-l6"
    """Model used when a request names none."""
    max_batch_size: int = Field(64, ge=1)
    """Most sequences one request may carry (unary or streaming), and one runtime batch."""
    max_batch_tokens: int = Field(4096, ge=1)
    """Most padded tokens (sequences x longest) in one runtime batch (a longer lone sequence runs alone)."""
    max_batch_attention_mib: int = Field(64, ge=1)
    """Most MiB of float32 attention one runtime batch may produce."""
    max_queue_delay_ms: float = Field(0.0, ge=0)
    """How long a sequence may wait for others to batch with when the runtime is idle."""
    max_queue_tokens: int = Field(65536, ge=1)
    """Most tokens waiting for the runtime; beyond it calls get RESOURCE_EXHAUSTED at once."""
    max_response_bytes: int = Field(256 * MiB, ge=MiB, le=1900 * MiB)
    """Largest unary response; bigger results must use AnalyzeStream or ask for less."""
    max_request_bytes: int = Field(16 * MiB, ge=MiB)
    """Largest request message the server accepts."""
    max_chars_per_token: int = Field(32, ge=1)
    """A text may have at most this many characters per model position (16,384 for 512 positions);
    longer texts are refused before they are tokenized."""
    max_pending_result_mib: int = Field(512, ge=1)
    """Memory budget (MiB) for results computed but not yet sent, over all calls; new work waits for room."""
    pending_result_wait: float = Field(30.0, ge=0)
    """Seconds a call may wait for room in that budget before RESOURCE_EXHAUSTED."""
    stream_window_mib: int = Field(64, ge=1)
    """Per streaming call: MiB of results computed ahead of what the caller has read (at least one result)."""
    max_stream_inflight: int = Field(8, ge=1)
    """Per ModelStreamInfer call: requests served at once; the server reads no further until one is answered."""
    max_concurrent_streams: int = Field(100, ge=1)
    """Calls at once on one client connection (HTTP/2 streams); a client's further calls wait on its side."""
    max_metadata_kib: int = Field(16, ge=1)
    """Largest request metadata (headers) in KiB."""
    keepalive_time: float = Field(60.0, gt=0)
    """Seconds between the server's keepalive pings on a connection (finds clients that vanished)."""
    keepalive_timeout: float = Field(20.0, gt=0)
    """Seconds a keepalive ping may go unanswered before the connection is closed."""
    min_client_ping_interval: float = Field(10.0, ge=0)
    """Clients may ping at most this often (seconds); each faster ping is a strike."""
    max_ping_strikes: int = Field(2, ge=0)
    """Strikes before the server closes the connection with GOAWAY (too_many_pings); 0 = no limit."""
    max_connection_idle: float = Field(300.0, ge=0)
    """Seconds a connection without calls stays open (it reconnects on its next call); 0 = no limit."""
    max_connection_age: float = Field(300.0, ge=0)
    """Seconds a client connection may live (gRPC adds +-10% jitter); then the server sends GOAWAY and the
    client reconnects, re-resolving its target, so long-lived clients spread over replicas added since (behind
    an L4 balancer or a headless Service). Calls in flight go on; 0 = no limit."""
    max_connection_age_grace: float = Field(120.0, ge=0)
    """Seconds the calls in flight on a connection past max_connection_age get to finish before it is closed
    (calls still running then are cancelled); 0 = no limit."""
    intra_op_threads: int = Field(0, ge=0)
    """ONNX Runtime threads of the wide session (a lone batch on an idle server); 0 = one per core."""
    instances: int = Field(0, ge=0)
    """Single-threaded runs side by side under load; 0 = one per core, 1 = only the wide session."""
    ort_memory_arena: Literal["keep", "shrink", "off"] = "shrink"
    """ONNX Runtime's CPU memory arena: `keep` holds the largest run's buffers for reuse (and never gives
    them back), `shrink` gives them back after large runs only, `off` allocates every run anew."""
    tune_malloc: bool = True
    """Raise glibc's mmap/trim thresholds so multi-MB responses reuse heap memory (see attention_client.memory)."""
    verify_checksums: bool = True
    """Check each model's sha256 against model.json when loading."""
    grace_period: float = Field(10.0, ge=0)
    """Seconds in-flight calls get to finish after SIGTERM."""
    http_port: int = Field(8000, ge=-1, le=65535)
    """HTTP/REST port: the Open Inference Protocol's REST API (/v2), attention.v1 as JSON (/v1) and the
    explorer page (/explore), with the same limits, TLS and tokens as gRPC. 0 picks a free port, -1 turns it off."""
    http_host: str | None = None
    """Address of the HTTP port; the gRPC port's (--host) when not set."""
    http_max_connections: int = Field(1000, ge=1)
    """Most HTTP connections open at once; a connection beyond it gets 503 (with Retry-After) and is closed,
    those already open keep being served."""
    http_keepalive_timeout: float = Field(15.0, gt=0)
    """Seconds an idle HTTP keep-alive connection stays open, and a client has to send a request's line and
    headers (which must fit in max_metadata_kib, else 431)."""
    http_body_timeout: float = Field(60.0, gt=0)
    """Seconds a client has to send a request's whole body once its headers are in; then 408 and the
    connection is closed."""
    http_write_timeout: float = Field(60.0, gt=0)
    """Seconds a reply may wait for the client to read the part of it sent before; then the connection
    is closed (a caller that stops reading holds its share of the result budget at most this long)."""
    metrics_host: str = "0.0.0.0"
    """Address of the Prometheus endpoint (plain HTTP). With TLS on and this not set, 127.0.0.1."""
    metrics_port: int = Field(8002, ge=-1, le=65535)
    """Prometheus /metrics port; 0 picks a free one, -1 turns the endpoint off."""
    tls_cert_file: Path | None = None
    """PEM certificate chain of the server; with tls_key_file, the gRPC port serves TLS only.
    Replacing the files rotates the certificate for new connections, no restart needed."""
    tls_key_file: Path | None = None
    """PEM private key of the server certificate."""
    tls_client_ca_file: Path | None = None
    """PEM CA certificates: clients must present a certificate signed by one of them (mutual TLS)."""
    auth_tokens_file: Path | None = None
    """Bearer tokens: one `ROLE:SHA256HEX` a line (roles `infer`, `admin`; `#` comments). When set, every
    call but health needs `authorization: Bearer <token>`. Re-read when the file changes."""
    model_control_mode: Literal["none", "explicit"] = "none"
    """`none`: models load at start only, RepositoryModelLoad/Unload are refused. `explicit`: they are
    allowed (to the `admin` role when tokens are on)."""
    shared_memory: bool = False
    """Triton's system shared-memory extension on the Open Inference Protocol (both ports): clients on this
    host register POSIX shared-memory objects (/dev/shm) by key; inputs are read from them and outputs
    written into them. Off by default: a caller who may register names any object the server's user can
    open, and has outputs written into it. With tokens on, the register/unregister/status calls need admin."""
    max_shared_memory_regions: int = Field(64, ge=1)
    """Most shared-memory regions registered at once; one more is refused (RESOURCE_EXHAUSTED)."""
    max_shared_memory_region_mib: int = Field(1024, ge=1)
    """Largest shared-memory region (MiB) a client may register."""
    max_shared_memory_total_mib: int = Field(4096, ge=1)
    """Most MiB of shared memory registered at once, over all regions."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line, with the call's request id."""
