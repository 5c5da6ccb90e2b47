# llm-worker: slim Python, a non-root user, settings from the environment.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY llm_worker ./llm_worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin llm-worker
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER llm-worker
ENV HEALTH_CHECK_HOST=0.0.0.0 \
    HEALTH_CHECK_PORT=3008 \
    LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
EXPOSE 3008
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3008/health/live', timeout=2).status != 200)"]
# The supervisor is PID 1's only child-reaper concern: it reaps its own workers,
# drains on SIGTERM (docker stop), and exits when they are done.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-worker"]
CMD ["run"]
