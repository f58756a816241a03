package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"mime"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/he/seedkey"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// BlobSource opens blobs by digest for streaming ("sha256:<hex>").
type BlobSource interface {
	Open(ctx context.Context, digest string) (io.ReadSeekCloser, error)
}

func blobURL(digest string) string {
	return "/v1/blobs/sha256/" + strings.TrimPrefix(digest, "sha256:")
}

// manifestVersion resolves the route's HE version, or writes the problem.
func (s *Server) manifestVersion(w http.ResponseWriter, r *http.Request) (*kms.Version, bool) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return nil, false
	}
	_, v, err := s.svc.Manifest(r.Context(), chi.URLParam(r, "name"), n)
	if err != nil {
		writeError(w, r, err)
		return nil, false
	}
	eventFrom(r).version = v.Number
	return v, true
}

func (s *Server) manifest(w http.ResponseWriter, r *http.Request) {
	v, ok := s.manifestVersion(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(v.Manifest)
}

func (s *Server) manifestSignature(w http.ResponseWriter, r *http.Request) {
	v, ok := s.manifestVersion(w, r)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, client.ManifestSignature{Algorithm: kms.IdentityKind, IdentityVersion: v.ManifestSigBy, Context: kms.ManifestContext, Signature: v.ManifestSig})
}

var hexRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// blob streams a blob from disk (Range, ETag, If-None-Match through
// http.ServeContent). A token sees only blobs of keys it may read.
func (s *Server) blob(w http.ResponseWriter, r *http.Request) {
	h := chi.URLParam(r, "hex")
	if !hexRE.MatchString(h) {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "a blob is named by 64 lower-case hex digits of its SHA-256")
		return
	}
	digest := "sha256:" + h
	ev := eventFrom(r)
	owner, err := s.svc.BlobOwner(r.Context(), digest)
	if err != nil {
		writeError(w, r, err)
		return
	}
	ev.key = owner
	if err := ev.principal.Authorize(kms.PermReadKey, owner); err != nil {
		// Do not tell a token which blobs exist for keys it cannot read.
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "no such blob")
		return
	}
	if s.opts.Blobs == nil {
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "no such blob")
		return
	}
	f, err := s.opts.Blobs.Open(r.Context(), digest)
	if errors.Is(err, he.ErrBlobNotFound) {
		// Indexed once but removed since (a destroyed version's
		// switching key).
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "no such blob")
		return
	}
	if err != nil {
		writeError(w, r, kms.Wrap(kms.KindInternal, "open blob", err))
		return
	}
	defer f.Close()
	// The store's bytes are checked against the digest before any is
	// served as it: once per version of the stored object (and again after
	// blobRecheck), and every GET is hashed as it streams from the start,
	// cut off if the bytes differ or the size changed.
	version := blobVersion(f)
	var size int64
	if version == "" || !s.blobs.verified(digest, version) {
		n, match, err := digestMatches(r.Context(), f, h)
		if err != nil {
			writeError(w, r, kms.Wrap(kms.KindUnavailable, "read blob", err))
			return
		}
		if !match {
			s.refuseCorrupt(w, r, digest, version, owner)
			return
		}
		size = n
		s.blobs.remember(digest, version)
	} else {
		n, err := f.Seek(0, io.SeekEnd)
		if err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
		if err != nil {
			writeError(w, r, kms.Wrap(kms.KindUnavailable, "read blob", err))
			return
		}
		size = n
	}
	form := r.URL.Query().Get("form")
	if form != "" && form != "full" && form != "seeded" {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "form must be seeded (the client expands seeded keys), full, or absent")
		return
	}
	seeded, err := isSeededBlob(f)
	if err != nil {
		writeError(w, r, kms.Wrap(kms.KindUnavailable, "read blob", err))
		return
	}
	switch {
	case seeded && form == "full":
		// A seeded key served expanded (its digest checked above), for
		// clients that cannot expand.
		s.serveExpanded(w, r, f, owner, digest)
		return
	case seeded && form == "":
		// A client that does not say it expands seeded keys is an older
		// SDK, which would crash decoding one as a full key.
		writeProblem(w, r, http.StatusNotAcceptable, ProbNotAcceptable, "this blob is a seeded key: ask ?form=seeded if the client expands seeded keys (kmsd's SDK does), or ?form=full for the key expanded")
		return
	}
	hr := &hashingReader{r: f, want: h, size: size}
	var content io.ReadSeeker = f
	if r.Method == http.MethodGet {
		content = hr
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("ETag", `"`+digest+`"`)
	w.Header().Set("Cache-Control", "private, max-age=31536000, immutable")
	streamAudited(w)
	http.ServeContent(&problemOnError{ResponseWriter: w, r: r}, r, "", time.Time{}, content)
	if hr.mismatch {
		// In the handler's goroutine (ServeContent copies multipart ranges
		// from one of its own): the client gets a cut-off answer.
		s.blobs.corrupt(digest, version)
		s.log.Error("a stored blob changed while it was served: the answer was cut off", "digest", digest, "key", owner)
		panic(http.ErrAbortHandler)
	}
}

// digestMatches reads the blob whole and says its size and whether its
// SHA-256 is the hex digest; it leaves the blob at its start and stops when
// ctx ends.
func digestMatches(ctx context.Context, f io.ReadSeeker, hexDigest string) (int64, bool, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return 0, false, err
	}
	hh := sha256.New()
	n, err := io.Copy(hh, ctxReader{ctx, f})
	if err != nil {
		return 0, false, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return 0, false, err
	}
	return n, hex.EncodeToString(hh.Sum(nil)) == hexDigest, nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

var errBlobChanged = errors.New("the stored blob changed while it was served")

// hashingReader serves a checked blob of the checked size: a size that
// differs is an error (ServeContent answers 500), and what is read from
// the start to the end is hashed; if the whole differs from the digest,
// the last read fails without its bytes and mismatch is set, for the
// handler to cut the answer off (no cache keeps a cut-off answer).
type hashingReader struct {
	r        io.ReadSeeker
	want     string
	size     int64
	mismatch bool
	h        hash.Hash
	pos      int64
}

func (h *hashingReader) Seek(off int64, whence int) (int64, error) {
	n, err := h.r.Seek(off, whence)
	if err != nil {
		return n, err
	}
	if whence == io.SeekEnd && off == 0 && n != h.size {
		return 0, errBlobChanged
	}
	h.pos = n
	h.h = nil // a read that does not start at 0 is not hashed
	if n == 0 {
		h.h = sha256.New()
	}
	return n, nil
}

func (h *hashingReader) Read(p []byte) (int, error) {
	if h.mismatch {
		return 0, errBlobChanged
	}
	n, err := h.r.Read(p)
	if h.h != nil {
		h.h.Write(p[:n])
		h.pos += int64(n)
		if h.pos >= h.size {
			if h.pos != h.size || hex.EncodeToString(h.h.Sum(nil)) != h.want {
				h.mismatch = true
				return 0, errBlobChanged
			}
			h.h = nil
		}
	}
	return n, err
}

// blobRecheck is how long a check of a stored blob's version counts: a
// change the version does not show (a write through a shared mapping, a
// coarse clock) is found at the next check.
const blobRecheck = 10 * time.Minute

// blobChecks remembers which stored blobs matched their digest (by the
// stored object's version, for blobRecheck) and which did not.
type blobChecks struct {
	mu   sync.Mutex
	ok   map[string]checked // digest -> version checked
	bad  map[string]string  // digest -> version that did not match
	once sync.Once
}

type checked struct {
	version string
	at      time.Time
}

func (b *blobChecks) init() {
	b.once.Do(func() { b.ok, b.bad = map[string]checked{}, map[string]string{} })
}

func (b *blobChecks) verified(digest, version string) bool {
	b.init()
	b.mu.Lock()
	defer b.mu.Unlock()
	c, ok := b.ok[digest]
	return ok && c.version == version && time.Since(c.at) < blobRecheck
}

func (b *blobChecks) remember(digest, version string) {
	b.init()
	b.mu.Lock()
	defer b.mu.Unlock()
	if bad, ok := b.bad[digest]; ok && bad != version {
		delete(b.bad, digest)
	}
	if version == "" || b.bad[digest] == version {
		return
	}
	if len(b.ok) >= 1<<16 {
		clear(b.ok)
	}
	b.ok[digest] = checked{version, time.Now()}
}

func (b *blobChecks) corrupt(digest, version string) {
	b.init()
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.ok, digest)
	if _, ok := b.bad[digest]; ok || len(b.bad) < 1024 {
		b.bad[digest] = version
	}
}

// failing is how many blobs' stored bytes did not match when last served.
func (b *blobChecks) failing() int {
	b.init()
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.bad)
}

// problemOnError turns the plain-text errors http.ServeContent writes (416
// for a range past the end, 412 for a failed If-Match) into problem
// documents, keeping headers such as Content-Range.
type problemOnError struct {
	http.ResponseWriter
	r       *http.Request
	replied bool
}

func (p *problemOnError) WriteHeader(code int) {
	if code < 400 || p.replied {
		p.ResponseWriter.WriteHeader(code)
		return
	}
	p.replied = true
	h := p.Header()
	for _, k := range []string{"ETag", "X-Content-Type-Options", "Content-Length"} {
		h.Del(k)
	}
	h.Set("Cache-Control", "no-store")
	switch code {
	case http.StatusRequestedRangeNotSatisfiable:
		writeProblem(p.ResponseWriter, p.r, code, ProbRange, "the requested range is not satisfiable (Content-Range gives the blob's size)")
	case http.StatusPreconditionFailed:
		writeProblem(p.ResponseWriter, p.r, code, ProbPrecondition, "the blob does not match If-Match")
	default:
		writeProblem(p.ResponseWriter, p.r, code, ProbInvalid, http.StatusText(code))
	}
}

func (p *problemOnError) Write(b []byte) (int, error) {
	if p.replied {
		return len(b), nil // the plain-text error text: replaced by the problem
	}
	return p.ResponseWriter.Write(b)
}

// decryptionOf resolves a decryption's key, version (named: not primary)
// and the largest ciphertext of its parameters, and checks the body is
// JSON (media says what it must hold); it writes the problem otherwise.
func (s *Server) decryptionOf(w http.ResponseWriter, r *http.Request, media string) (string, uint64, int64, bool) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return "", 0, 0, false
	}
	if n == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "name the version the ciphertext was encrypted under")
		return "", 0, 0, false
	}
	name := chi.URLParam(r, "name")
	eventFrom(r).version = n
	limit, err := s.svc.MaxCiphertextSize(r.Context(), name, n)
	if err != nil {
		writeError(w, r, err)
		return "", 0, 0, false
	}
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		writeProblem(w, r, http.StatusUnsupportedMediaType, ProbUnsupportedMedia, media)
		return "", 0, 0, false
	}
	return name, n, limit, true
}

// decrypt takes a Lattigo ciphertext (MarshalBinary) as the body, limited
// to the size a ciphertext of the version's parameters can have.
func (s *Server) decrypt(w http.ResponseWriter, r *http.Request) {
	name, n, limit, ok := s.decryptionOf(w, r, "the body must be a ciphertext envelope (application/json): key, version, params_id, level, scale, slots, ciphertext")
	if !ok {
		return
	}
	ev := eventFrom(r)
	// The envelope carries the ciphertext in base64, plus a few fields and
	// its attestation (an ML-DSA-65 signature and a statement).
	bodyLimit := limit/3*4 + 96<<10
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, bodyLimit))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		writeProblem(w, r, http.StatusRequestEntityTooLarge, ProbBodyTooLarge, fmt.Sprintf("a ciphertext for these parameters is at most %d bytes (an envelope at most %d)", limit, bodyLimit))
		return
	}
	if err != nil {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "could not read the request body")
		return
	}
	ev.bytesIn = len(body)
	env, err := kms.ParseEnvelope(body, int(limit))
	if err != nil {
		writeError(w, r, err)
		return
	}
	pending(r, http.StatusOK)
	res, err := s.call(r).Decrypt(r.Context(), name, n, env)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, client.DecryptResponse{Values: res.Values, Version: res.Version, Precision: res.Precision})
}

// attest vouches for a ciphertext: an input (encryptor) or an evaluation
// on attested inputs (worker); the service checks the role for the op.
func (s *Server) attest(w http.ResponseWriter, r *http.Request) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	if n == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "name the version the ciphertext is under")
		return
	}
	var req client.AttestRequest
	if !readBody(w, r, &req, false) {
		return
	}
	ev := eventFrom(r)
	ev.version = n
	a, st, err := s.call(r).Attest(r.Context(), ev.principal, chi.URLParam(r, "name"), n, kms.AttestRequest{
		Digest: req.Digest, Level: req.Level, Scale: req.Scale, Slots: req.Slots, Op: req.Op,
		Inputs: req.Inputs, Amplification: req.Amplification, KeySwitches: req.KeySwitches})
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, client.AttestResponse{Attestation: a, Statement: st})
}

// refuseCorrupt answers a blob whose stored bytes do not match its
// digest: counted (readyz), logged, 500 blob-corrupt.
func (s *Server) refuseCorrupt(w http.ResponseWriter, r *http.Request, digest, version, owner string) {
	s.blobs.corrupt(digest, version)
	s.log.Error("a stored blob does not match its digest: refused; restore it from a backup or regenerate the key version", "digest", digest, "key", owner)
	writeProblem(w, r, http.StatusInternalServerError, ProbBlobCorrupt, "the blob store holds other bytes under this digest; kmsd does not serve them (the operator is told)")
}

// blobVersion is the stored object's version, if the store has one.
func blobVersion(f any) string {
	if v, ok := f.(interface{ BlobVersion() string }); ok {
		return v.BlobVersion()
	}
	return ""
}

// isSeededBlob reports whether the blob is a seeded key (its first bytes),
// leaving it at its start.
func isSeededBlob(f io.ReadSeeker) (bool, error) {
	head := make([]byte, 8)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return false, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return false, err
	}
	return seedkey.IsSeeded(head[:n]), nil
}

// expansions bounds the seeded keys being expanded at once for ?form=full
// (CPU, and the seeded and full bytes in memory), expanded the answers
// being written (each holds its full key in memory until written: a
// client that stops reading is cut off by expandedWriteTimeout).
var (
	expansions = make(chan struct{}, 2)
	expanded   = make(chan struct{}, 4)
)

// expandedWriteTimeout is how long one write of an expanded key may take
// (a client that stops reading gives its memory back).
const expandedWriteTimeout = 30 * time.Second

// serveExpanded answers ?form=full for a seeded blob f (its bytes checked
// against digest): the key expanded, with the full form's digest as its
// ETag, Range as for any blob. HEAD and a matching If-None-Match are
// answered from the signed manifest, without expanding.
func (s *Server) serveExpanded(w http.ResponseWriter, r *http.Request, f io.ReadSeeker, owner, digest string) {
	fail := func(err error) {
		writeError(w, r, kms.Wrap(kms.KindInternal, "expand seeded key", err))
	}
	l, err := s.svc.BlobListing(r.Context(), owner, digest)
	if err != nil {
		writeError(w, r, err)
		return
	}
	var m wire.Manifest
	if err := json.Unmarshal(l.Manifest, &m); err != nil {
		fail(err)
		return
	}
	ref := l.Ref
	kind := map[string]seedkey.Kind{"public": seedkey.Public, "relinearization": seedkey.Relinearization, "galois": seedkey.Galois, "switching": seedkey.Switching}[l.Role]
	lit, err := m.Literal()
	if err != nil || ref.Form != wire.FormSeeded {
		fail(fmt.Errorf("the manifest does not list %s as seeded", digest))
		return
	}
	etag := `"` + ref.FullDigest + `"`
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "private, max-age=31536000, immutable")
	w.Header().Set("Accept-Ranges", "bytes")
	if inm := r.Header.Get("If-None-Match"); inm != "" && (inm == "*" || strings.Contains(inm, etag)) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	if r.Method == http.MethodHead {
		w.Header().Set("Content-Length", strconv.FormatInt(ref.FullSize, 10))
		w.WriteHeader(http.StatusOK)
		return
	}
	busy := func() {
		w.Header().Set("Retry-After", "1")
		writeProblem(w, r, http.StatusServiceUnavailable, ProbBusy, "other keys are being expanded or sent expanded; retry, or fetch the seeded blob (?form=seeded) and expand it, as the SDK does")
	}
	select {
	case expanded <- struct{}{}:
		defer func() { <-expanded }()
	default:
		busy()
		return
	}
	full, err := func() ([]byte, error) {
		select {
		case expansions <- struct{}{}:
			defer func() { <-expansions }()
		default:
			return nil, errBusy
		}
		p, err := he.Resolve(he.Scheme(m.Kind), lit)
		if err != nil {
			return nil, err
		}
		b, err := io.ReadAll(f)
		if err != nil {
			return nil, err
		}
		// The bytes expanded are the ones checked (the check above may be
		// a remembered one).
		if sum := sha256.Sum256(b); "sha256:"+hex.EncodeToString(sum[:]) != digest {
			return nil, errBlobChanged
		}
		k, err := seedkey.Expand(p.RLWE(), kind, b)
		if err != nil {
			return nil, err
		}
		full, err := k.MarshalBinary()
		if err != nil {
			return nil, err
		}
		if sum := sha256.Sum256(full); "sha256:"+hex.EncodeToString(sum[:]) != ref.FullDigest {
			return nil, fmt.Errorf("seeded blob %s does not expand to %s", digest, ref.FullDigest)
		}
		return full, nil
	}()
	switch {
	case errors.Is(err, errBusy):
		busy()
		return
	case errors.Is(err, errBlobChanged):
		s.refuseCorrupt(w, r, digest, blobVersion(f), owner)
		return
	case err != nil:
		fail(err)
		return
	}
	streamAudited(w)
	http.ServeContent(&problemOnError{ResponseWriter: &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w)}, r: r}, r, "", time.Time{}, bytes.NewReader(full))
}

var errBusy = errors.New("busy")

// deadlineWriter gives each write expandedWriteTimeout.
type deadlineWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
}

func (d *deadlineWriter) Write(b []byte) (int, error) {
	_ = d.rc.SetWriteDeadline(time.Now().Add(expandedWriteTimeout))
	return d.ResponseWriter.Write(b)
}

func (d *deadlineWriter) Unwrap() http.ResponseWriter { return d.ResponseWriter }
