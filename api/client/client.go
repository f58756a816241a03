// Package client is the Go SDK for kmsd's REST API, used by workers and by
// kmsctl.
package client

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/internal/tlsutil"
)

// Client talks to one kmsd.
type Client struct {
	base  *url.URL
	token string
	http  *http.Client
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sets the HTTP client (for TLS settings or timeouts).
func WithHTTPClient(h *http.Client) Option { return func(c *Client) { c.http = h } }

// WithTLS sets the TLS configuration of the default HTTP client (for
// example from TLSConfig).
func WithTLS(cfg *tls.Config) Option {
	return func(c *Client) {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = cfg
		c.http = &http.Client{Timeout: 60 * time.Second, Transport: t}
	}
}

// HTTPClient is the HTTP client c sends with (its TLS settings), for
// hekeys.Fetcher.HTTP, so both reach kmsd the same way.
func (c *Client) HTTPClient() *http.Client { return c.http }

// TLSConfig is the client TLS configuration for kmsd: TLS 1.3, the hybrid
// post-quantum key exchange X25519MLKEM768 first and X25519 as the
// fallback, caFile (PEM) as the roots to trust (the system's when empty;
// for the embedded default, <data-dir>/tls/ca.pem), and an optional client
// certificate and key for mutual TLS.
func TLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS13, CurvePreferences: tlsutil.CurvePreferences}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("CA certificate: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("CA certificate %s: no PEM certificate in it", caFile)
		}
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("a client certificate needs both its certificate and its key file")
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c, nil
}

// New returns a client for the server at baseURL (for example
// "https://127.0.0.1:8420") authenticating with token.
func New(baseURL, token string, opts ...Option) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("server address %q must be an http:// or https:// URL", baseURL)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	c := &Client{base: u, token: token, http: &http.Client{Timeout: 60 * time.Second}}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Error is a problem answered by the server.
type Error struct {
	Problem
}

func (e *Error) Error() string {
	s := fmt.Sprintf("%d %s", e.Status, e.Title)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

// IsProblem reports whether err is a server problem of the given type suffix
// (for example "not-found").
func IsProblem(err error, typ string) bool {
	var e *Error
	return errors.As(err, &e) && strings.HasSuffix(e.Type, ":"+typ)
}

// StatusOf returns the HTTP status of a server problem, or 0 for other errors
// (transport failures).
func StatusOf(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return 0
}

func (c *Client) do(ctx context.Context, method, path string, query url.Values, in, out any) error {
	_, err := c.doStatus(ctx, method, path, query, in, func(int) any { return out })
	return err
}

// doStatus is do with the answer's body decoded into what pick returns for
// its status.
func (c *Client) doStatus(ctx context.Context, method, path string, query url.Values, in any, pick func(status int) any) (int, error) {
	u := *c.base
	u.Path += path
	u.RawPath = ""
	if query != nil {
		u.RawQuery = query.Encode()
	}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return 0, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return resp.StatusCode, ProblemError(resp.StatusCode, b)
	}
	out := pick(resp.StatusCode)
	if out == nil {
		return resp.StatusCode, nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return resp.StatusCode, fmt.Errorf("decode %s %s response: %w", method, path, err)
	}
	return resp.StatusCode, nil
}

func keyPath(name string, rest ...string) string {
	p := "/v1/keys/" + url.PathEscape(name)
	for _, r := range rest {
		p += "/" + r
	}
	return p
}

// VersionRef is a version number, or 0 for the primary version.
func versionRef(v uint64) string {
	if v == 0 {
		return "primary"
	}
	return strconv.FormatUint(v, 10)
}

// Health calls GET /healthz.
func (c *Client) Health(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/healthz", nil, nil, nil)
}

// Ready calls GET /readyz.
func (c *Client) Ready(ctx context.Context) error {
	return c.do(ctx, http.MethodGet, "/readyz", nil, nil, nil)
}

// Readiness calls GET /readyz and returns what it says (the audit
// archive's state among it).
func (c *Client) Readiness(ctx context.Context) (*Health, error) {
	var out Health
	return &out, c.do(ctx, http.MethodGet, "/readyz", nil, nil, &out)
}

// Identity returns the service's identity public key.
func (c *Client) Identity(ctx context.Context) (*Identity, error) {
	var out Identity
	return &out, c.do(ctx, http.MethodGet, "/v1/identity", nil, nil, &out)
}

// CreateKey creates a key.
func (c *Client) CreateKey(ctx context.Context, req CreateKeyRequest) (*Key, error) {
	var out Key
	return &out, c.do(ctx, http.MethodPost, "/v1/keys", nil, req, &out)
}

// pageQuery is the query of a paged list: limit (0: the server's default)
// and the page token ("" for the first page).
func pageQuery(limit int, pageToken string) url.Values {
	q := url.Values{}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	if pageToken != "" {
		q.Set("page_token", pageToken)
	}
	return q
}

// ListKeys returns one page of keys; pass the previous NextPageToken to go on.
func (c *Client) ListKeys(ctx context.Context, limit int, pageToken string) (*KeyList, error) {
	q := pageQuery(limit, pageToken)
	var out KeyList
	return &out, c.do(ctx, http.MethodGet, "/v1/keys", q, nil, &out)
}

// GetKey returns a key with its newest versions (the server's default
// page, 100).
func (c *Client) GetKey(ctx context.Context, name string) (*Key, error) {
	return c.GetKeyVersions(ctx, name, 0)
}

// GetKeyVersions returns a key with up to limit of its newest versions (0:
// the server's default).
func (c *Client) GetKeyVersions(ctx context.Context, name string, limit int) (*Key, error) {
	q := pageQuery(limit, "")
	var out Key
	return &out, c.do(ctx, http.MethodGet, keyPath(name), q, nil, &out)
}

// GetKeyIfChanged is GetKeyVersions with If-None-Match: it returns the
// key and its ETag, or (nil, etag) when the key's answer has not changed
// since etag (kmsd answered 304). Workers poll with it for rotations.
func (c *Client) GetKeyIfChanged(ctx context.Context, name string, limit int, etag string) (*Key, string, error) {
	u := *c.base
	u.Path += keyPath(name)
	u.RawPath = ""
	u.RawQuery = pageQuery(limit, "").Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if etag != "" {
		req.Header.Set("If-None-Match", etag)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotModified:
		return nil, etag, nil
	case resp.StatusCode >= 400:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, "", ProblemError(resp.StatusCode, b)
	}
	var k Key
	if err := json.NewDecoder(resp.Body).Decode(&k); err != nil {
		return nil, "", fmt.Errorf("decode key %s: %w", name, err)
	}
	return &k, resp.Header.Get("ETag"), nil
}

// ListVersions returns a page of a key's versions, newest first; pageToken
// is "" or the NextPageToken of the previous page (or the key's
// NextVersionsPageToken).
func (c *Client) ListVersions(ctx context.Context, name string, limit int, pageToken string) (*VersionList, error) {
	q := pageQuery(limit, pageToken)
	var out VersionList
	return &out, c.do(ctx, http.MethodGet, keyPath(name)+"/versions", q, nil, &out)
}

// UpdateKey changes a key's policy or min_decryption_version; the answer
// carries no versions.
func (c *Client) UpdateKey(ctx context.Context, name string, req UpdateKeyRequest) (*Key, error) {
	var out Key
	return &out, c.do(ctx, http.MethodPatch, keyPath(name), nil, req, &out)
}

// Rotate makes a new primary version.
func (c *Client) Rotate(ctx context.Context, name string) (*Version, error) {
	var out Version
	return &out, c.do(ctx, http.MethodPost, keyPath(name, "rotate"), nil, nil, &out)
}

// PublicKey returns a version's public key (version 0: the primary).
func (c *Client) PublicKey(ctx context.Context, name string, version uint64) (*PublicKey, error) {
	var out PublicKey
	return &out, c.do(ctx, http.MethodGet, keyPath(name, "versions", versionRef(version), "public-key"), nil, nil, &out)
}

// VersionAction is one of "disable", "enable", "schedule-destroy",
// "cancel-destroy".
func (c *Client) VersionAction(ctx context.Context, name string, version uint64, action string, days int) (*Version, error) {
	var in any
	if action == "schedule-destroy" && days != 0 {
		in = ScheduleDestroyRequest{Days: days}
	}
	var out Version
	return &out, c.do(ctx, http.MethodPost, keyPath(name, "versions", strconv.FormatUint(version, 10), action), nil, in, &out)
}

// Sign signs message with the key's primary version.
func (c *Client) Sign(ctx context.Context, name string, message, sigContext []byte) (*SignResponse, error) {
	var out SignResponse
	return &out, c.do(ctx, http.MethodPost, keyPath(name, "sign"), nil, SignRequest{Message: message, Context: sigContext}, &out)
}

// Verify checks a signature with a given version.
func (c *Client) Verify(ctx context.Context, name string, version uint64, message, signature, sigContext []byte) (bool, error) {
	var out VerifyResponse
	err := c.do(ctx, http.MethodPost, keyPath(name, "verify"), nil, VerifyRequest{Message: message, Signature: signature, Version: version, Context: sigContext}, &out)
	return out.Valid, err
}

// Decapsulate recovers an ML-KEM shared secret.
func (c *Client) Decapsulate(ctx context.Context, name string, version uint64, ciphertext []byte) (*DecapsulateResponse, error) {
	var out DecapsulateResponse
	return &out, c.do(ctx, http.MethodPost, keyPath(name, "decapsulate"), nil, DecapsulateRequest{Ciphertext: ciphertext, Version: version}, &out)
}

// CreateToken creates a bearer token.
func (c *Client) CreateToken(ctx context.Context, req CreateTokenRequest) (*Token, error) {
	var out Token
	return &out, c.do(ctx, http.MethodPost, "/v1/tokens", nil, req, &out)
}

// ListTokens returns one page of the tokens this token may manage (never
// their secrets); pass the previous NextPageToken to go on.
func (c *Client) ListTokens(ctx context.Context, limit int, pageToken string) (*TokenList, error) {
	q := pageQuery(limit, pageToken)
	var out TokenList
	return &out, c.do(ctx, http.MethodGet, "/v1/tokens", q, nil, &out)
}

// GetToken returns a token's metadata.
func (c *Client) GetToken(ctx context.Context, id string) (*TokenInfo, error) {
	var out TokenInfo
	return &out, c.do(ctx, http.MethodGet, "/v1/tokens/"+url.PathEscape(id), nil, nil, &out)
}

// IntrospectToken asks kmsd whether token is active and what it may do
// (the caller needs the introspect-tokens permission: worker or admin).
func (c *Client) IntrospectToken(ctx context.Context, token string) (*Introspection, error) {
	var out Introspection
	return &out, c.do(ctx, http.MethodPost, "/v1/tokens/introspect", nil, IntrospectRequest{Token: token}, &out)
}

// AuthServerMetadata reads kmsd's OAuth authorization server metadata
// (RFC 8414): its issuer and token endpoint.
func (c *Client) AuthServerMetadata(ctx context.Context) (*AuthServerMetadata, error) {
	var out AuthServerMetadata
	return &out, c.do(ctx, http.MethodGet, "/.well-known/oauth-authorization-server", nil, nil, &out)
}

// RevokeToken revokes a token: every later request with it is refused.
func (c *Client) RevokeToken(ctx context.Context, id string) (*TokenInfo, error) {
	var out TokenInfo
	return &out, c.do(ctx, http.MethodDelete, "/v1/tokens/"+url.PathEscape(id), nil, nil, &out)
}

// getRaw fetches a non-JSON resource.
func (c *Client) getRaw(ctx context.Context, path string, query url.Values) ([]byte, error) {
	return c.rawBody(ctx, http.MethodGet, path, query, "", nil)
}

// rawBody sends a request with an optional raw body and returns the
// answer's body, or the server's problem as an *Error.
func (c *Client) rawBody(ctx context.Context, method, path string, query url.Values, contentType string, body []byte) ([]byte, error) {
	u := *c.base
	u.Path += path
	if query != nil {
		u.RawQuery = query.Encode()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 400 {
		return nil, ProblemError(resp.StatusCode, b)
	}
	return b, nil
}

// Blob streams the content-addressed blob digest ("sha256:<hex>") as
// stored (a seeded key in its seeded form) to w and checks that what
// arrived hashes to it. On a mismatch w has received bytes that must be
// thrown away.
func (c *Client) Blob(ctx context.Context, digest string, w io.Writer) error {
	h, ok := strings.CutPrefix(digest, "sha256:")
	if _, err := hex.DecodeString(h); !ok || err != nil || len(h) != 64 {
		return fmt.Errorf("malformed blob digest %q", digest)
	}
	return c.fetchVerified(ctx, "/v1/blobs/sha256/"+h, url.Values{"form": {"seeded"}}, digest, w)
}

// PublicKeyBlob streams an HE version's public key (pk from PublicKey:
// its full form, which kmsd expands from a seeded key) to w and checks
// that what arrived hashes to pk.Digest.
func (c *Client) PublicKeyBlob(ctx context.Context, pk *PublicKey, w io.Writer) error {
	p, rawQuery, _ := strings.Cut(pk.URL, "?")
	if !strings.HasPrefix(p, "/v1/blobs/sha256/") {
		return fmt.Errorf("public key URL %q is not a blob of kmsd's", pk.URL)
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return fmt.Errorf("public key URL %q: %v", pk.URL, err)
	}
	return c.fetchVerified(ctx, p, q, pk.Digest, w)
}

// fetchVerified streams path to w and checks that what arrived hashes to
// digest.
func (c *Client) fetchVerified(ctx context.Context, path string, query url.Values, digest string, w io.Writer) error {
	h, ok := strings.CutPrefix(digest, "sha256:")
	if _, err := hex.DecodeString(h); !ok || err != nil || len(h) != 64 {
		return fmt.Errorf("malformed blob digest %q", digest)
	}
	u := *c.base
	u.Path += path
	u.RawQuery = query.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return ProblemError(resp.StatusCode, b)
	}
	sum := sha256.New()
	if _, err := io.Copy(io.MultiWriter(w, sum), resp.Body); err != nil {
		return err
	}
	if hex.EncodeToString(sum.Sum(nil)) != h {
		return fmt.Errorf("blob %s: the bytes received do not hash to it", digest)
	}
	return nil
}

// ProblemError turns an error answer into an *Error, from its problem
// document when it has one (also for callers that make their own requests,
// such as hekeys).
func ProblemError(status int, body []byte) *Error {
	e := &Error{}
	if json.Unmarshal(body, &e.Problem) != nil || e.Status == 0 {
		e.Problem = Problem{Status: status, Title: http.StatusText(status)}
	}
	return e
}

// AuditCheckpoint returns the latest signed checkpoint (a signed note).
func (c *Client) AuditCheckpoint(ctx context.Context) ([]byte, error) {
	return c.getRaw(ctx, "/v1/audit/checkpoint", nil)
}

// AuditTile returns a resource of the audit archive by its tlog-tiles
// path (checkpoint, tile/<L>/<N>[.p/<W>], tile/entries/<N>[.p/<W>]).
func (c *Client) AuditTile(ctx context.Context, path string) ([]byte, error) {
	return c.getRaw(ctx, "/v1/audit/tiles/"+path, nil)
}

// AuditRecords returns records [start, end), each exactly as hashed into the
// tree. It pages through the server's per-request limit.
func (c *Client) AuditRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	var out [][]byte
	for start < end {
		stop := min(end, start+10000)
		b, err := c.getRaw(ctx, "/v1/audit/records", url.Values{"start": {strconv.FormatUint(start, 10)}, "end": {strconv.FormatUint(stop, 10)}})
		if err != nil {
			return nil, err
		}
		lines := bytes.Split(b, []byte("\n"))
		if len(lines) == 0 || len(lines[len(lines)-1]) != 0 {
			return nil, fmt.Errorf("records [%d, %d): the answer does not end in a newline", start, stop)
		}
		lines = lines[:len(lines)-1]
		if uint64(len(lines)) != stop-start {
			return nil, fmt.Errorf("records [%d, %d): got %d lines", start, stop, len(lines))
		}
		out = append(out, lines...)
		start = stop
	}
	return out, nil
}

// Proof is an audit inclusion or consistency proof.
type Proof struct {
	Index *uint64  `json:"index,omitempty"` // an inclusion proof's record
	Old   *uint64  `json:"old,omitempty"`   // a consistency proof's older size
	Size  uint64   `json:"size"`
	Proof [][]byte `json:"proof"`
}

// InclusionProof proves record index is in the tree of the given size.
func (c *Client) InclusionProof(ctx context.Context, index, size uint64) (*Proof, error) {
	var out Proof
	q := url.Values{"index": {strconv.FormatUint(index, 10)}, "size": {strconv.FormatUint(size, 10)}}
	return &out, c.do(ctx, http.MethodGet, "/v1/audit/proof/inclusion", q, nil, &out)
}

// ConsistencyProof proves the tree of size old is a prefix of the tree of
// the given size.
func (c *Client) ConsistencyProof(ctx context.Context, old, size uint64) (*Proof, error) {
	var out Proof
	q := url.Values{"old": {strconv.FormatUint(old, 10)}, "size": {strconv.FormatUint(size, 10)}}
	return &out, c.do(ctx, http.MethodGet, "/v1/audit/proof/consistency", q, nil, &out)
}

// Decrypt sends a ciphertext envelope to be decrypted with the key version
// it names (decryptor or admin token) and returns the slots in use: CKKS
// slots as their real parts rounded to the key's precision, BGV slots as
// integers.
func (c *Client) Decrypt(ctx context.Context, env *Envelope) ([]float64, error) {
	vals, _, err := c.DecryptFull(ctx, env)
	return vals, err
}

// DecryptFull is Decrypt with the precision kept after noise flooding.
func (c *Client) DecryptFull(ctx context.Context, env *Envelope) ([]float64, int, error) {
	body, err := json.Marshal(env)
	if err != nil {
		return nil, 0, err
	}
	b, err := c.rawBody(ctx, http.MethodPost, keyPath(env.Key, "versions", strconv.FormatUint(env.Version, 10), "decrypt"), nil, "application/json", body)
	if err != nil {
		return nil, 0, err
	}
	var out struct {
		Values    []float64 `json:"values"`
		Precision int       `json:"precision"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, 0, fmt.Errorf("decrypt response: %w", err)
	}
	return out.Values, out.Precision, nil
}

// Attest asks kmsd to vouch for a ciphertext of version n of key name
// (see AttestRequest): an encryptor token for an input, an evaluator token
// for an evaluation.
func (c *Client) Attest(ctx context.Context, name string, n uint64, req AttestRequest) (*AttestResponse, error) {
	var out AttestResponse
	if err := c.do(ctx, http.MethodPost, keyPath(name, "versions", strconv.FormatUint(n, 10), "attest"), nil, req, &out); err != nil {
		return nil, err
	}
	if out.Attestation == nil {
		return nil, errors.New("attest response: no attestation")
	}
	return &out, nil
}

// CreateKeyOrOperation creates a key; a large HE keyset answers 202 and
// comes back as an Operation to follow with WaitOperation.
func (c *Client) CreateKeyOrOperation(ctx context.Context, req CreateKeyRequest) (*Key, *Operation, error) {
	var k Key
	var op Operation
	st, err := c.doStatus(ctx, http.MethodPost, "/v1/keys", nil, req, func(s int) any {
		if s == http.StatusAccepted {
			return &op
		}
		return &k
	})
	if err != nil {
		return nil, nil, err
	}
	if st == http.StatusAccepted {
		return nil, &op, nil
	}
	return &k, nil, nil
}

// RotateOrOperation rotates; a large HE keyset answers 202 (see
// CreateKeyOrOperation).
func (c *Client) RotateOrOperation(ctx context.Context, name string) (*Version, *Operation, error) {
	var v Version
	var op Operation
	st, err := c.doStatus(ctx, http.MethodPost, keyPath(name, "rotate"), nil, nil, func(s int) any {
		if s == http.StatusAccepted {
			return &op
		}
		return &v
	})
	if err != nil {
		return nil, nil, err
	}
	if st == http.StatusAccepted {
		return nil, &op, nil
	}
	return &v, nil, nil
}

// GetOperation returns an operation's state.
func (c *Client) GetOperation(ctx context.Context, id string) (*Operation, error) {
	var op Operation
	return &op, c.do(ctx, http.MethodGet, "/v1/operations/"+url.PathEscape(id), nil, nil, &op)
}

// WaitOperation polls an operation every interval until it ends, calling
// progress (if set) with each state. A failed operation is an error.
func (c *Client) WaitOperation(ctx context.Context, id string, every time.Duration, progress func(*Operation)) (*Operation, error) {
	for {
		op, err := c.GetOperation(ctx, id)
		if err != nil {
			return nil, err
		}
		if progress != nil {
			progress(op)
		}
		switch op.State {
		case "succeeded":
			return op, nil
		case "failed":
			return op, fmt.Errorf("operation %s failed: %s", op.ID, op.Error)
		}
		select {
		case <-ctx.Done():
			return op, ctx.Err()
		case <-time.After(every):
		}
	}
}

// Backup streams a backup of everything kmsd holds (GET /v1/backup; an
// admin token over "*") to w and returns its id, which the server sends
// after the last byte. withBlobs false lists the HE blobs by digest
// only. A backup cut short (err != nil) has no trailer: every reader
// refuses it. The caller checks the file (store/backup) before it keeps
// it.
func (c *Client) Backup(ctx context.Context, w io.Writer, withBlobs bool) (string, error) {
	u := *c.base
	u.Path += "/v1/backup"
	if !withBlobs {
		u.RawQuery = "blobs=false"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return "", err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return "", ProblemError(resp.StatusCode, b)
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return "", fmt.Errorf("the backup stream broke off: %w", err)
	}
	id := resp.Trailer.Get("Kmsd-Backup-Id")
	if id == "" {
		return "", errors.New("the backup stream ended without its id: kmsd did not finish it")
	}
	return id, nil
}

// KEKStatus is GET /v1/kek (an admin over "*"); count adds how many
// secrets each KEK seals.
func (c *Client) KEKStatus(ctx context.Context, count bool) (*KEKStatus, error) {
	var q url.Values
	if count {
		q = url.Values{"count": {"true"}}
	}
	var out KEKStatus
	return &out, c.do(ctx, http.MethodGet, "/v1/kek", q, nil, &out)
}

// RotateKEK starts a KEK rotation (POST /v1/kek/rotate): a new KEK is
// primary at once; KEKStatus follows the rewrap.
func (c *Client) RotateKEK(ctx context.Context) (*KEKStatus, error) {
	var out KEKStatus
	return &out, c.do(ctx, http.MethodPost, "/v1/kek/rotate", nil, nil, &out)
}

// RetireKEK destroys an old KEK in the HSM (POST /v1/kek/{id}/retire),
// refused while anything is sealed under it.
func (c *Client) RetireKEK(ctx context.Context, id string) (*KEKStatus, error) {
	var out KEKStatus
	return &out, c.do(ctx, http.MethodPost, "/v1/kek/"+url.PathEscape(id)+"/retire", nil, nil, &out)
}

// RenewToken extends the client's own token by its ttl, up to its
// maximum lifetime (POST /v1/tokens/self/renew).
func (c *Client) RenewToken(ctx context.Context) (*TokenInfo, error) {
	var out TokenInfo
	return &out, c.do(ctx, http.MethodPost, "/v1/tokens/self/renew", nil, nil, &out)
}

// GaloisKeys asks kmsd for the Galois keys of rotations (and the
// conjugation) of version (0: primary) of key name: those it lacks are
// generated. A request whose new keys are large answers 202: the
// operation is returned (WaitOperation, then ask again for the result).
func (c *Client) GaloisKeys(ctx context.Context, name string, version uint64, req GaloisKeysRequest) (*GaloisKeysResult, *Operation, error) {
	var res GaloisKeysResult
	var op Operation
	st, err := c.doStatus(ctx, http.MethodPost, keyPath(name, "versions", versionRef(version), "evaluation-keys"), nil, req, func(s int) any {
		if s == http.StatusAccepted {
			return &op
		}
		return &res
	})
	if err != nil {
		return nil, nil, err
	}
	if st == http.StatusAccepted {
		return nil, &op, nil
	}
	return &res, nil, nil
}

// SwitchingKey asks kmsd for the switching key from version from of key
// name to its later version to, generated the first time.
func (c *Client) SwitchingKey(ctx context.Context, name string, from, to uint64) (*SwitchingKeyResult, error) {
	var res SwitchingKeyResult
	return &res, c.do(ctx, http.MethodPost, keyPath(name, "versions", versionRef(from), "switching-keys"), nil, SwitchingKeyRequest{ToVersion: to}, &res)
}

// Extension returns the signed extension of version (0: primary) of key
// name, unverified (hekeys verifies it against the pinned identity key).
func (c *Client) Extension(ctx context.Context, name string, version uint64) (*SignedExtension, error) {
	var e SignedExtension
	return &e, c.do(ctx, http.MethodGet, keyPath(name, "versions", versionRef(version), "evaluation-keys", "extension"), nil, nil, &e)
}

// ThresholdDecrypt asks kmsd for the partial decryptions of env by a
// threshold key's parties towards publicKey (hekeys.ThresholdDecrypt does
// the rest).
func (c *Client) ThresholdDecrypt(ctx context.Context, env *Envelope, publicKey []byte, requester *RequesterSignature) (*ThresholdDecryptResult, error) {
	var res ThresholdDecryptResult
	return &res, c.do(ctx, http.MethodPost, keyPath(env.Key, "versions", versionRef(env.Version), "threshold-decrypt"), nil, ThresholdDecryptRequest{Ciphertext: env, PublicKey: publicKey, Requester: requester}, &res)
}
