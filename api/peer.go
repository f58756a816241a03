package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// PeerContext is the ML-DSA context of the signatures on messages
// between kmsd nodes (requests and answers).
const PeerContext = "kmsd-peer-v1"

// peerWindow is how far a peer request's time may be from this node's.
const peerWindow = 2 * time.Minute

// maxPeerBody bounds a peer message (a threshold setup carries a keyset).
const maxPeerBody = 5 << 30

// PeerConfig is the --peers file: this node's name and the other nodes,
// each with the URL it serves, its pinned ML-DSA-65 identity public key
// (base64, as kmsctl identity prints it) and the CA that signs its TLS
// certificate.
type PeerConfig struct {
	Self  string     `json:"self"`
	Peers []PeerInfo `json:"peers"`
}

// PeerInfo is one peer.
type PeerInfo struct {
	Name     string `json:"name"`
	URL      string `json:"url"`
	Identity string `json:"identity"`
	CACert   string `json:"ca_cert"`
}

// LoadPeerConfig reads and checks a --peers file.
func LoadPeerConfig(path string) (*PeerConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c PeerConfig
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &c, nil
}

// Peers is kms.Peers over HTTPS: every request and answer is signed with
// the sender's identity key (context PeerContext) and verified against
// the receiver's pinned copy; TLS authenticates the server by its CA.
type Peers struct {
	self  string
	peers map[string]*peer
	sign  func(ctx context.Context, msg, context []byte) ([]byte, error)
	own   func() []byte // this node's identity public key
	now   func() time.Time

	mu   sync.Mutex
	seen map[[32]byte]time.Time // request signatures seen within peerWindow
}

type peer struct {
	name string
	url  *url.URL
	pub  *mldsa65.PublicKey
	http *http.Client
}

// NewPeers checks a peer configuration and makes the transport.
func NewPeers(c *PeerConfig) (*Peers, error) {
	if err := kms.ValidateName(c.Self); err != nil {
		return nil, fmt.Errorf("peers: self: %w", err)
	}
	p := &Peers{self: c.Self, peers: map[string]*peer{}, now: time.Now, seen: map[[32]byte]time.Time{}}
	for _, pi := range c.Peers {
		if err := kms.ValidateName(pi.Name); err != nil || pi.Name == c.Self || p.peers[pi.Name] != nil {
			return nil, fmt.Errorf("peers: %q: a peer name is a key-like name, unique, other than self", pi.Name)
		}
		u, err := url.Parse(pi.URL)
		if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return nil, fmt.Errorf("peers: %s: url must be https://host:port", pi.Name)
		}
		raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(pi.Identity))
		if err != nil {
			return nil, fmt.Errorf("peers: %s: identity is not base64", pi.Name)
		}
		var pub mldsa65.PublicKey
		if err := pub.UnmarshalBinary(raw); err != nil {
			return nil, fmt.Errorf("peers: %s: identity is not an ML-DSA-65 public key", pi.Name)
		}
		pem, err := os.ReadFile(pi.CACert)
		if err != nil {
			return nil, fmt.Errorf("peers: %s: ca_cert: %w", pi.Name, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("peers: %s: ca_cert holds no certificate", pi.Name)
		}
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, ForceAttemptHTTP2: true}
		p.peers[pi.Name] = &peer{name: pi.Name, url: u, pub: &pub, http: &http.Client{Transport: tr}}
	}
	if len(p.peers) == 0 {
		return nil, errors.New("peers: no peer")
	}
	return p, nil
}

// SetIdentity gives the transport this node's signer and identity public
// key (the service's; set once it exists).
func (p *Peers) SetIdentity(sign func(ctx context.Context, msg, context []byte) ([]byte, error), own func() []byte) {
	p.sign, p.own = sign, own
}

// Self implements kms.Peers.
func (p *Peers) Self() string { return p.self }

// Known implements kms.Peers.
func (p *Peers) Known(name string) bool { return name == p.self || p.peers[name] != nil }

// Names lists the configured peers.
func (p *Peers) Names() []string {
	var out []string
	for n := range p.peers {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Verify implements kms.Peers.
func (p *Peers) Verify(name string, msg, context, sig []byte) bool {
	if name == p.self {
		var pub mldsa65.PublicKey
		if p.own == nil || pub.UnmarshalBinary(p.own()) != nil {
			return false
		}
		return mldsa65.Verify(&pub, msg, context, sig)
	}
	pe := p.peers[name]
	return pe != nil && mldsa65.Verify(pe.pub, msg, context, sig)
}

func requestMessage(from, to, op, at string, body []byte) []byte {
	sum := sha256.Sum256(body)
	return requestMessageDigest(from, to, op, at, hex.EncodeToString(sum[:]))
}

// requestMessageDigest is requestMessage from the body's SHA-256 (hex):
// the receiver checks the signature before it reads the body.
func requestMessageDigest(from, to, op, at, digest string) []byte {
	return []byte("kmsd peer request\n" + from + "\n" + to + "\n" + op + "\n" + at + "\n" + digest)
}

func answerMessage(reqSig []byte, status int, body []byte) []byte {
	rs := sha256.Sum256(reqSig)
	sum := sha256.Sum256(body)
	return []byte("kmsd peer answer\n" + hex.EncodeToString(rs[:]) + "\n" + strconv.Itoa(status) + "\n" + hex.EncodeToString(sum[:]))
}

// Send implements kms.Peers.
func (p *Peers) Send(ctx context.Context, to, op string, body []byte) ([]byte, error) {
	pe := p.peers[to]
	if pe == nil {
		return nil, kms.Errorf(kms.KindInvalid, "no peer %q", to)
	}
	if p.sign == nil {
		return nil, kms.Errorf(kms.KindUnavailable, "peers: no identity yet")
	}
	at := strconv.FormatInt(p.now().Unix(), 10)
	sig, err := p.sign(ctx, requestMessage(p.self, to, op, at, body), []byte(PeerContext))
	if err != nil {
		return nil, err
	}
	u := *pe.url
	u.Path = "/v1/peer/" + op
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Kmsd-Peer", p.self)
	req.Header.Set("Kmsd-Peer-Time", at)
	req.Header.Set("Kmsd-Peer-Signature", base64.StdEncoding.EncodeToString(sig))
	sum := sha256.Sum256(body)
	req.Header.Set("Kmsd-Peer-Body-Sha256", hex.EncodeToString(sum[:]))
	resp, err := pe.http.Do(req)
	if err != nil {
		return nil, kms.Wrap(kms.KindUnavailable, "peer "+to, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, maxPeerBody+1))
	if err != nil {
		return nil, kms.Wrap(kms.KindUnavailable, "peer "+to, err)
	}
	asig, err := base64.StdEncoding.DecodeString(resp.Header.Get("Kmsd-Peer-Signature"))
	if err != nil || !mldsa65.Verify(pe.pub, answerMessage(sig, resp.StatusCode, out), []byte(PeerContext), asig) {
		return nil, kms.Errorf(kms.KindUnavailable, "peer %s: the answer (%d) is not signed by its identity key", to, resp.StatusCode)
	}
	if resp.StatusCode != http.StatusOK {
		pe := client.ProblemError(resp.StatusCode, out)
		return nil, kms.Errorf(kindOfStatus(resp.StatusCode), "peer %s: %s", to, pe.Problem.Detail)
	}
	return out, nil
}

// kindOfStatus maps a peer's answer back to an error kind.
func kindOfStatus(status int) kms.Kind {
	switch status {
	case http.StatusBadRequest:
		return kms.KindInvalid
	case http.StatusNotFound:
		return kms.KindNotFound
	case http.StatusConflict:
		return kms.KindFailedPrecondition
	case http.StatusForbidden, http.StatusUnauthorized:
		return kms.KindPermissionDenied
	case http.StatusRequestEntityTooLarge:
		return kms.KindTooLarge
	case http.StatusTooManyRequests:
		return kms.KindExhausted
	}
	return kms.KindUnavailable
}

// peerRequest answers POST /v1/peer/{op}: a message from another node,
// authenticated by its signature (no bearer token), audited with the
// peer as the actor.
func (s *Server) peerRequest(w http.ResponseWriter, r *http.Request) {
	p := s.opts.Peers
	ev := eventFrom(r)
	op := chi.URLParam(r, "op")
	if p == nil || !slices.Contains(kms.PeerOps, op) {
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "no such endpoint")
		return
	}
	from := r.Header.Get("Kmsd-Peer")
	at := r.Header.Get("Kmsd-Peer-Time")
	digest := r.Header.Get("Kmsd-Peer-Body-Sha256")
	sig, err := base64.StdEncoding.DecodeString(r.Header.Get("Kmsd-Peer-Signature"))
	_, derr := hex.DecodeString(digest)
	when, terr := strconv.ParseInt(at, 10, 64)
	// Who sends, when, and the signature over the body's digest, before
	// the body is read: the endpoint takes no bearer token, and a body
	// may be large.
	switch {
	case err != nil || !p.Known(from) || from == p.self || terr != nil || derr != nil || len(digest) != 2*sha256.Size:
		writeProblem(w, r, http.StatusUnauthorized, ProbUnauthenticated, "not a peer of this node")
		return
	case p.now().Sub(time.Unix(when, 0)).Abs() > peerWindow:
		writeProblem(w, r, http.StatusUnauthorized, ProbUnauthenticated, "the peer's clock is more than 2m from this node's")
		return
	case !p.peers[from].verify(requestMessageDigest(from, p.self, op, at, digest), sig):
		writeProblem(w, r, http.StatusUnauthorized, ProbUnauthenticated, "the request is not signed by the peer's identity key")
		return
	case !p.fresh(sig):
		writeProblem(w, r, http.StatusUnauthorized, ProbUnauthenticated, "a replayed peer request")
		return
	}
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/octet-stream" {
		writeProblem(w, r, http.StatusUnsupportedMediaType, ProbUnsupportedMedia, "a peer message is application/octet-stream")
		return
	}
	body, rerr := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxPeerBody))
	if rerr != nil {
		writeProblem(w, r, http.StatusRequestEntityTooLarge, ProbBodyTooLarge, "a peer message is at most 5 GiB")
		return
	}
	ev.bytesIn = len(body)
	if sum := sha256.Sum256(body); hex.EncodeToString(sum[:]) != digest {
		writeProblem(w, r, http.StatusUnauthorized, ProbUnauthenticated, "the request is not signed by the peer's identity key")
		return
	}
	if ev.rec != nil {
		ev.rec.Actor, ev.rec.Role = "peer:"+from, "peer"
	}
	out, herr := s.call(r).HandlePeer(r.Context(), from, op, body)
	// The body may hold a Shamir share of a party's secret; nothing
	// HandlePeer keeps points into it.
	clear(body)
	sw := &signedAnswer{ResponseWriter: w, s: s, r: r, reqSig: sig}
	if herr != nil {
		sw.fail(herr)
		return
	}
	sw.send(http.StatusOK, "application/octet-stream", out)
}

func (pe *peer) verify(msg, sig []byte) bool {
	return mldsa65.Verify(pe.pub, msg, []byte(PeerContext), sig)
}

// fresh records a request signature; false if it was seen within the
// window.
func (p *Peers) fresh(sig []byte) bool {
	h := sha256.Sum256(sig)
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	for k, t := range p.seen {
		if now.Sub(t) > 2*peerWindow {
			delete(p.seen, k)
		}
	}
	if _, dup := p.seen[h]; dup {
		return false
	}
	p.seen[h] = now
	return true
}

// signedAnswer writes a peer answer with this node's signature over it.
type signedAnswer struct {
	http.ResponseWriter
	s      *Server
	r      *http.Request
	reqSig []byte
}

func (a *signedAnswer) send(status int, contentType string, body []byte) {
	sig, _, err := a.s.svc.SignAsIdentity(a.r.Context(), answerMessage(a.reqSig, status, body), []byte(PeerContext))
	if err != nil {
		writeError(a.ResponseWriter, a.r, err)
		return
	}
	a.Header().Set("Kmsd-Peer-Signature", base64.StdEncoding.EncodeToString(sig))
	a.Header().Set("Content-Type", contentType)
	a.WriteHeader(status)
	_, _ = a.Write(body)
}

// fail answers err as a problem, signed.
func (a *signedAnswer) fail(err error) {
	var buf problemBuffer
	writeError(&buf, a.r, err)
	a.send(buf.status, "application/problem+json", buf.body.Bytes())
}

// problemBuffer catches a problem answer to sign it.
type problemBuffer struct {
	h      http.Header
	status int
	body   bytes.Buffer
}

func (b *problemBuffer) Header() http.Header {
	if b.h == nil {
		b.h = http.Header{}
	}
	return b.h
}
func (b *problemBuffer) WriteHeader(s int)           { b.status = s }
func (b *problemBuffer) Write(p []byte) (int, error) { return b.body.Write(p) }
