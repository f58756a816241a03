// Package hekeys is what an MCP worker embeds to get the public and
// evaluation keys of an HE key from kmsd: it fetches the version's manifest
// and its signature, checks the signature against a pinned identity key,
// downloads each blob (resuming with Range), checks every digest, caches
// blobs on disk by digest, and returns ready Lattigo objects. Any mismatch
// is an error; a key that fails a check is never returned.
package hekeys

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/he/seedkey"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// ManifestContext is the ML-DSA context of manifest signatures.
const ManifestContext = wire.ManifestContext

// Manifest is a version's list of blobs, as kmsd signs it.
type Manifest = wire.Manifest

// Keys are a verified HE version's public material.
type Keys struct {
	Manifest       Manifest
	Scheme         string          // "ckks" or "bgv"
	CKKS           ckks.Parameters // set for ckks
	BGV            bgv.Parameters  // set for bgv
	PublicKey      *rlwe.PublicKey
	EvaluationKeys *rlwe.MemEvaluationKeySet
	// IdentityKey is the pinned identity key the manifest was verified
	// with; VerifyAttestation checks attestations with it.
	IdentityKey []byte

	mu        sync.Mutex
	extension *wire.ManifestExtension // verified; nil: none
	lazy      bool                    // FetchLazy: Galois keys on request
}

// Fetcher gets keys from one kmsd.
type Fetcher struct {
	BaseURL string // e.g. http://127.0.0.1:8420
	Token   string // a token that reads the keys (worker, evaluator, encryptor, ...)
	// IdentityKey is the pinned ML-DSA-65 public key of the service (GET
	// /v1/identity once, over a trusted channel).
	IdentityKey []byte
	// CacheDir keeps blobs by digest; a second fetch sends only conditional
	// requests.
	CacheDir string
	HTTP     *http.Client
	// Progress, if set, is called as blob bytes arrive (or are found in
	// the cache) with the bytes done and the total of the version's blobs.
	// A Fetcher may be used by several goroutines at once.
	Progress func(done, total int64)
	// StallTimeout fails a request to kmsd that makes no progress for
	// this long: no response headers, or no byte of the body (a blob
	// download then resumes where it stopped on the next fetch). Zero:
	// DefaultStallTimeout; negative: none (the context alone bounds the
	// fetch).
	StallTimeout time.Duration
}

// DefaultStallTimeout is a Fetcher's StallTimeout when it sets none.
const DefaultStallTimeout = 30 * time.Second

// ErrStalled is the class of a request to kmsd that stopped making
// progress for the Fetcher's StallTimeout.
var ErrStalled = errors.New("hekeys: the request to kmsd stalled")

// progress counts one Fetch's or Download's bytes.
type progress struct {
	done, total int64
	report      func(done, total int64)
}

func (f *Fetcher) newProgress(m *Manifest) *progress {
	p := &progress{report: f.Progress}
	for _, r := range m.Blobs() {
		p.total += r.Size
	}
	return p
}

func (p *progress) advance(n int64) {
	p.done += n
	if p.report != nil {
		p.report(p.done, p.total)
	}
}

// ErrVerify is the class of every failed check.
var ErrVerify = errors.New("hekeys: verification failed")

func verifyErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrVerify, fmt.Sprintf(format, args...))
}

// get sends a GET to kmsd. Unless StallTimeout is negative, a watchdog
// cancels the request when it makes no progress for StallTimeout: from
// the start until the response headers, then between reads of the body
// that return bytes; the error is then ErrStalled.
func (f *Fetcher) get(ctx context.Context, path string, hdr map[string]string) (*http.Response, error) {
	stall := f.StallTimeout
	if stall == 0 {
		stall = DefaultStallTimeout
	}
	var wd *watchdog
	if stall > 0 {
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		wd = &watchdog{ctx: ctx, cancel: cancel, d: stall, err: fmt.Errorf("%w: no byte from kmsd for %s (GET %s)", ErrStalled, stall, path)}
		wd.t = time.AfterFunc(stall, func() { cancel(wd.err) })
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(f.BaseURL, "/")+path, nil)
	if err != nil {
		wd.stop()
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+f.Token)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	hc := f.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		err = wd.cause(err)
		wd.stop()
		return nil, err
	}
	if wd != nil {
		wd.t.Reset(stall)
		resp.Body = &watchedBody{ReadCloser: resp.Body, wd: wd}
	}
	return resp, nil
}

// watchdog cancels a request that makes no progress for d.
type watchdog struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	t      *time.Timer
	d      time.Duration
	err    error // the cause it cancels with
}

func (w *watchdog) stop() {
	if w != nil {
		w.t.Stop()
		w.cancel(nil)
	}
}

// cause is err, or the watchdog's error if it fired.
func (w *watchdog) cause(err error) error {
	if w != nil && errors.Is(context.Cause(w.ctx), ErrStalled) {
		return w.err
	}
	return err
}

// watchedBody resets its watchdog on every read that returns bytes.
type watchedBody struct {
	io.ReadCloser
	wd *watchdog
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.wd.t.Reset(b.wd.d)
	}
	if err != nil && err != io.EOF {
		err = b.wd.cause(err)
	}
	return n, err
}

func (b *watchedBody) Close() error {
	b.wd.stop()
	return b.ReadCloser.Close()
}

func (f *Fetcher) getAll(ctx context.Context, path string) ([]byte, error) {
	resp, err := f.get(ctx, path, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, client.ProblemError(resp.StatusCode, b)
	}
	return b, nil
}

// Fetch returns the verified keys of version (0: primary) of key name.
func (f *Fetcher) Fetch(ctx context.Context, name string, version uint64) (*Keys, error) {
	return f.fetch(ctx, name, version, true)
}

// FetchPublic is Fetch without the evaluation keys: the verified manifest,
// parameters and public key, all an encrypting party needs.
func (f *Fetcher) FetchPublic(ctx context.Context, name string, version uint64) (*Keys, error) {
	return f.fetch(ctx, name, version, false)
}

func (f *Fetcher) fetch(ctx context.Context, name string, version uint64, evaluation bool) (*Keys, error) {
	k := &Keys{IdentityKey: f.IdentityKey}
	raw, _, err := f.manifest(ctx, name, version)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(raw, &k.Manifest); err != nil {
		return nil, verifyErr("malformed manifest")
	}
	return f.keys(ctx, k, evaluation)
}

// Download fetches and verifies the manifest of version (0: primary) of
// key name and its extension, and every blob they list, into CacheDir (blobs named by their hex
// digest, a partial download resumed with Range), without loading them.
// It writes the manifest's exact signed bytes to manifest-<version>.json
// and its signature to manifest-<version>.sig.json there too (and the
// signed extension to extension-<version>.json), and returns the manifest.
func (f *Fetcher) Download(ctx context.Context, name string, version uint64) (*Manifest, error) {
	raw, sig, err := f.manifest(ctx, name, version)
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, verifyErr("malformed manifest")
	}
	ext, extDoc, err := f.extension(ctx, &m)
	if err != nil {
		return nil, err
	}
	blobs := m.Blobs()
	if ext != nil {
		blobs = append(blobs, ext.Blobs()...)
	}
	pr := &progress{report: f.Progress}
	for _, r := range blobs {
		pr.total += r.Size
	}
	for _, r := range blobs {
		if _, err := f.blob(ctx, r.Digest, r.Size, pr); err != nil {
			return nil, err
		}
	}
	files := map[string][]byte{fmt.Sprintf("manifest-%d.json", m.Version): raw, fmt.Sprintf("manifest-%d.sig.json", m.Version): sig}
	if ext != nil {
		files[fmt.Sprintf("extension-%d.json", m.Version)] = extDoc
	}
	for file, data := range files {
		if err := os.WriteFile(filepath.Join(f.CacheDir, file), data, 0o644); err != nil {
			return nil, err
		}
	}
	return &m, nil
}

// Manifest fetches and verifies the manifest of version (0: primary) of
// key name, without its blobs: a caller checks a ciphertext's parameters
// against it before it loads the keys.
func (f *Fetcher) Manifest(ctx context.Context, name string, version uint64) (*Manifest, error) {
	raw, _, err := f.manifest(ctx, name, version)
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, verifyErr("malformed manifest")
	}
	return &m, nil
}

// manifest fetches a version's manifest and signature and checks the
// signature against the pinned identity key, the key, version and
// parameters hash; it returns the manifest's exact bytes and the
// signature document.
func (f *Fetcher) manifest(ctx context.Context, name string, version uint64) (raw, sigb []byte, err error) {
	ref := "primary"
	if version != 0 {
		ref = fmt.Sprint(version)
	}
	base := "/v1/keys/" + name + "/versions/" + ref + "/evaluation-keys"
	if raw, err = f.getAll(ctx, base); err != nil {
		return nil, nil, err
	}
	if sigb, err = f.getAll(ctx, base+"/signature"); err != nil {
		return nil, nil, err
	}
	var sig client.ManifestSignature
	if err := json.Unmarshal(sigb, &sig); err != nil {
		return nil, nil, verifyErr("malformed manifest signature")
	}
	var pk mldsa65.PublicKey
	if err := pk.UnmarshalBinary(f.IdentityKey); err != nil {
		return nil, nil, fmt.Errorf("hekeys: pinned identity key: %w", err)
	}
	if sig.Algorithm != "ml-dsa-65" || sig.Context != ManifestContext || !mldsa65.Verify(&pk, raw, []byte(ManifestContext), sig.Signature) {
		return nil, nil, verifyErr("the manifest of %s version %s is not signed by the pinned identity key", name, ref)
	}
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, nil, verifyErr("malformed manifest")
	}
	if m.Key != name || (version != 0 && m.Version != version) {
		return nil, nil, verifyErr("asked for %s version %s, the manifest is of %s version %d", name, ref, m.Key, m.Version)
	}
	lit, err := m.Literal()
	if err != nil {
		return nil, nil, verifyErr("malformed manifest parameters")
	}
	sum := sha256.Sum256(lit)
	if "sha256:"+hex.EncodeToString(sum[:]) != m.ParamsID {
		return nil, nil, verifyErr("the manifest's parameters do not hash to its params_id")
	}
	return raw, sigb, nil
}

// keys loads the verified manifest's parameters and blobs.
func (f *Fetcher) keys(ctx context.Context, k *Keys, evaluation bool) (*Keys, error) {
	m := &k.Manifest
	pr := f.newProgress(m)
	if !evaluation {
		pr.total = m.PublicKey.Size
	} else if k.lazy {
		pr.total = m.PublicKey.Size
		if m.RelinearizationKey != nil {
			pr.total += m.RelinearizationKey.Size
		}
	}
	lit, err := m.Literal()
	if err != nil {
		return nil, verifyErr("malformed manifest parameters")
	}
	var rp rlwe.Parameters
	switch m.Kind {
	case "ckks":
		if err := k.CKKS.UnmarshalJSON(lit); err != nil {
			return nil, verifyErr("parameters: %v", err)
		}
		rp = k.CKKS.Parameters
	case "bgv":
		if err := k.BGV.UnmarshalJSON(lit); err != nil {
			return nil, verifyErr("parameters: %v", err)
		}
		rp = k.BGV.Parameters
	default:
		return nil, verifyErr("unknown kind %q", m.Kind)
	}
	k.Scheme = m.Kind
	data, err := f.blob(ctx, m.PublicKey.Digest, m.PublicKey.Size, pr)
	if err != nil {
		return nil, err
	}
	if k.PublicKey, err = decodeKey(rp, m.PublicKey, seedkey.Public, data, rlwe.NewPublicKey(rp)); err != nil {
		return nil, verifyErr("public key: %v", err)
	}
	if !evaluation {
		return k, nil
	}
	var rlk *rlwe.RelinearizationKey
	if m.RelinearizationKey != nil {
		data, err := f.blob(ctx, m.RelinearizationKey.Digest, m.RelinearizationKey.Size, pr)
		if err != nil {
			return nil, err
		}
		if rlk, err = decodeKey(rp, *m.RelinearizationKey, seedkey.Relinearization, data, rlwe.NewRelinearizationKey(rp)); err != nil {
			return nil, verifyErr("relinearization key: %v", err)
		}
	}
	ext, _, err := f.extension(ctx, m)
	if err != nil {
		return nil, err
	}
	k.setExtension(ext)
	galois := m.GaloisKeys
	if k.lazy {
		galois = nil
	} else if ext != nil {
		galois = append(slices.Clone(galois), ext.GaloisKeys...)
		for _, g := range ext.GaloisKeys {
			pr.total += g.Size
		}
	}
	var gks []*rlwe.GaloisKey
	for _, g := range galois {
		data, err := f.blob(ctx, g.Digest, g.Size, pr)
		if err != nil {
			return nil, err
		}
		gk, err := decodeKey(rp, g.Ref(), seedkey.Galois, data, rlwe.NewGaloisKey(rp))
		if err != nil {
			return nil, verifyErr("galois key %d: %v", g.GaloisElement, err)
		}
		if gk.GaloisElement != g.GaloisElement {
			return nil, verifyErr("the blob listed for Galois element %d holds %d", g.GaloisElement, gk.GaloisElement)
		}
		gks = append(gks, gk)
	}
	k.EvaluationKeys = rlwe.NewMemEvaluationKeySet(rlk, gks...)
	return k, nil
}

// decodeKey reads a key from its blob (its digest already checked): the
// full form decoded into full (a new key of its kind), or a seeded form
// expanded and checked against the full form's digest the signed manifest
// names.
func decodeKey[K interface {
	seedkey.Key
	UnmarshalBinary([]byte) error
}](rp rlwe.Parameters, ref wire.BlobRef, kind seedkey.Kind, data []byte, full K) (K, error) {
	var zero K
	switch ref.Form {
	case "":
		return full, full.UnmarshalBinary(data)
	case wire.FormSeeded:
		k, err := seedkey.Expand(rp, kind, data)
		if err != nil {
			return zero, err
		}
		kk, ok := k.(K)
		wt, ok2 := k.(io.WriterTo)
		if !ok || !ok2 {
			return zero, fmt.Errorf("the seeded key is a %T", k)
		}
		// The full form hashed as it is written (no copy of the key).
		h := sha256.New()
		n, err := wt.WriteTo(h)
		if err != nil {
			return zero, err
		}
		if "sha256:"+hex.EncodeToString(h.Sum(nil)) != ref.FullDigest || n != ref.FullSize {
			return zero, errors.New("the seeded key does not expand to the key the manifest names")
		}
		return kk, nil
	}
	return zero, fmt.Errorf("blob form %q: this SDK knows full and seeded keys", ref.Form)
}

// blob returns a blob's bytes, from the cache when its digest checks
// (after a conditional request, so the server still decides access), else
// downloaded (resuming a partial download with Range) and checked.
func (f *Fetcher) blob(ctx context.Context, digest string, size int64, pr *progress) ([]byte, error) {
	h, ok := strings.CutPrefix(digest, "sha256:")
	if !ok || len(h) != 64 {
		return nil, verifyErr("malformed digest %q", digest)
	}
	if _, err := hex.DecodeString(h); err != nil {
		return nil, verifyErr("malformed digest %q", digest)
	}
	// form=seeded: this SDK expands seeded keys (kmsd refuses to send one
	// to a client that does not say so: an older SDK would crash on it).
	path := "/v1/blobs/sha256/" + h + "?form=seeded"
	final := filepath.Join(f.CacheDir, h)
	if err := os.MkdirAll(f.CacheDir, 0o700); err != nil {
		return nil, err
	}
	// One download of a blob at a time into the cache dir (its partial
	// file is shared so that a download resumes): calls of this process
	// take turns on a lock, processes sharing the dir on a file lock.
	unlock, err := lockBlob(ctx, final)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if data, err := os.ReadFile(final); err == nil && matches(data, h, size) {
		resp, err := f.get(ctx, path, map[string]string{"If-None-Match": `"` + digest + `"`})
		if err != nil {
			return nil, err
		}
		var b []byte
		if resp.StatusCode != http.StatusNotModified && resp.StatusCode != http.StatusOK {
			b, _ = io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusNotModified {
			pr.advance(size)
			return data, nil
		}
		if resp.StatusCode != http.StatusOK {
			return nil, client.ProblemError(resp.StatusCode, b)
		}
	}
	part := final + ".part"
	var have int64
	if fi, err := os.Stat(part); err == nil && fi.Size() < size {
		have = fi.Size()
		pr.advance(have)
	} else {
		os.Remove(part)
	}
	hdr := map[string]string{}
	if have > 0 {
		hdr["Range"] = fmt.Sprintf("bytes=%d-", have)
	}
	resp, err := f.get(ctx, path, hdr)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	flags := os.O_WRONLY | os.O_CREATE
	switch {
	case resp.StatusCode == http.StatusPartialContent && have > 0:
		flags |= os.O_APPEND
	case resp.StatusCode == http.StatusOK:
		flags |= os.O_TRUNC
	default:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, client.ProblemError(resp.StatusCode, b)
	}
	out, err := os.OpenFile(part, flags, 0o600)
	if err != nil {
		return nil, err
	}
	_, err = io.Copy(progressWriter{out, pr}, io.LimitReader(resp.Body, size+1))
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("download %s (resumable): %w", digest, err)
	}
	data, err := os.ReadFile(part)
	if err != nil {
		return nil, err
	}
	if !matches(data, h, size) {
		os.Remove(part)
		return nil, verifyErr("blob %s does not match its digest or size", digest)
	}
	if err := os.Rename(part, final); err != nil {
		return nil, err
	}
	return data, nil
}

// progressWriter reports each write to the fetcher's progress.
type progressWriter struct {
	w io.Writer
	p *progress
}

func (p progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.p.advance(int64(n))
	return n, err
}

func matches(data []byte, h string, size int64) bool {
	sum := sha256.Sum256(data)
	return int64(len(data)) == size && hex.EncodeToString(sum[:]) == h
}

// blobLocks are this process's locks of blobs being downloaded, by path:
// an entry lives while some call holds or waits for it, so that the map
// does not grow with every blob ever fetched (a long-running server sees
// a new keyset at every rotation).
var blobLocks struct {
	sync.Mutex
	m map[string]*blobLock
}

type blobLock struct {
	sem  chan struct{} // a one-slot semaphore
	refs int           // calls holding or waiting for it
}

// lockBlob takes the lock of the blob at final: a semaphore of this
// process (so that ctx ends the wait), then an exclusive file lock on the
// cache dir itself (another process sharing it; no lock file is left in
// the dir, which may be a user's output dir). unlock releases both.
func lockBlob(ctx context.Context, final string) (unlock func(), err error) {
	blobLocks.Lock()
	if blobLocks.m == nil {
		blobLocks.m = map[string]*blobLock{}
	}
	l := blobLocks.m[final]
	if l == nil {
		l = &blobLock{sem: make(chan struct{}, 1)}
		blobLocks.m[final] = l
	}
	l.refs++
	blobLocks.Unlock()
	release := func() {
		blobLocks.Lock()
		if l.refs--; l.refs == 0 {
			delete(blobLocks.m, final)
		}
		blobLocks.Unlock()
	}
	select {
	case l.sem <- struct{}{}:
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
	lf, err := os.Open(filepath.Dir(final))
	if err != nil {
		<-l.sem
		release()
		return nil, err
	}
	if err := flock(ctx, lf); err != nil {
		lf.Close()
		<-l.sem
		release()
		return nil, err
	}
	return func() {
		lf.Close() // releases the file lock
		<-l.sem
		release()
	}, nil
}
