package api

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/kms"
)

// RecordSink receives each committed audit record (the streaming copy for a
// SIEM). Emit must return quickly.
type RecordSink interface {
	Emit(record []byte)
}

// bufferedWriter holds a response until its audit record is durable. A
// handler that streams a large body (blobs) switches it to streaming: the
// record is then committed when the status is written, before any byte
// leaves, and the body goes straight through.
type bufferedWriter struct {
	header http.Header
	status int
	body   *bytes.Buffer // from bodyPool

	stream    bool
	out       http.ResponseWriter
	commit    func(status int, size int) bool // false: the record failed, 503 was written
	refused   bool
	committed bool
	streamed  int
}

func (b *bufferedWriter) Header() http.Header { return b.header }
func (b *bufferedWriter) WriteHeader(code int) {
	if b.status != 0 {
		return
	}
	b.status = code
	if b.stream {
		size, _ := strconv.Atoi(b.header.Get("Content-Length"))
		b.committed = true
		if !b.commit(code, size) {
			b.refused = true
			return
		}
		b.out.WriteHeader(code)
	}
}
func (b *bufferedWriter) Write(p []byte) (int, error) {
	if b.status == 0 {
		b.WriteHeader(http.StatusOK)
	}
	if b.stream {
		if b.refused {
			return 0, errAuditRefused
		}
		n, err := b.out.Write(p)
		b.streamed += n
		return n, err
	}
	return b.body.Write(p)
}

var errAuditRefused = errors.New("the audit record was not durable: answer withheld")

// bodyPool recycles the buffers that hold answers until their record is
// durable: a buffer per request was a quarter of the bytes every audited
// request allocated (and so of the garbage collections under load).
var bodyPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// putBody zeroes a buffer (answers carry shared secrets and decryptions)
// and returns it to the pool; large ones are left to the collector.
func putBody(b *bytes.Buffer) {
	b.Reset()
	buf := b.Bytes()
	clear(buf[:cap(buf)])
	if cap(buf) <= 64<<10 {
		bodyPool.Put(b)
	}
}

// streamAudited switches w (when it is the audit buffer) to streaming.
func streamAudited(w http.ResponseWriter) {
	if b, ok := w.(*bufferedWriter); ok && b.out != nil {
		b.stream = true
	}
}

// pending marks the request as a state change that will answer status if it
// succeeds: its record then commits in the same transaction as the change.
func pending(r *http.Request, status int) {
	if ev := eventFrom(r); ev != nil && ev.rec != nil {
		ev.rec.Status = status
		ev.rec.ReqBytes = ev.bytesIn
		if ev.principal != nil {
			ev.rec.Actor, ev.rec.Role = ev.principal.TokenID, string(ev.principal.Role)
		}
		ev.rec.Operation = operation(r)
	}
}

func operation(r *http.Request) string {
	if rc := chi.RouteContext(r.Context()); rc != nil && rc.RoutePattern() != "" {
		return r.Method + " " + rc.RoutePattern()
	}
	m := r.Method
	if len(m) > 16 || !safeSegment(strings.ToLower(m)) {
		m = redacted(m)
	}
	return m + " " + clipField(safePath(r.URL.Path), 120) + " (no such route)"
}

// audited records every request, answered or refused, authenticated or not.
// The response is held until its record is durable; if the record cannot be
// made durable the client gets 503 instead (fail-closed). A state change's
// record was already committed with the change itself.
func (s *Server) audited(next http.Handler) http.Handler {
	if s.opts.Audit == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		release := s.opts.Audit.Expect()
		defer release()
		ev := eventFrom(r)
		rec := &kms.AuditRecord{Time: time.Now().UTC().Format(time.RFC3339Nano), RequestID: ev.id, Actor: "anonymous", Source: r.RemoteAddr}
		ev.rec = rec // the one record of this request (server.call passes it on)
		bw := &bufferedWriter{header: w.Header(), out: w, body: bodyPool.Get().(*bytes.Buffer)}
		defer putBody(bw.body)
		// record completes and commits rec for an answer of status and
		// size; on failure it writes 503 instead and returns false.
		record := func(status, size int) bool {
			rec.Operation = operation(r)
			if ev.principal != nil {
				rec.Actor, rec.Role = ev.principal.TokenID, string(ev.principal.Role)
			}
			if rec.Key == "" {
				rec.Key = ev.key
			}
			if rec.Version == 0 {
				rec.Version = ev.version
			}
			rec.Status, rec.Problem, rec.ReqBytes, rec.RespBytes = status, ev.problem, ev.bytesIn, size
			capRecord(rec)
			release()
			// The answer waits for durability even if the client left.
			err := s.opts.Audit.AppendAudit(context.WithoutCancel(r.Context()), rec)
			if s.opts.Metrics != nil {
				s.opts.Metrics.Audited(err)
			}
			if err != nil {
				ev.err = fmt.Errorf("audit record not durable: %w", err)
				for k := range w.Header() {
					if k != "X-Request-Id" {
						w.Header().Del(k)
					}
				}
				w.Header().Set("Cache-Control", "no-store")
				if errors.Is(err, kms.ErrOutcomeUnknown) {
					// The record (saying the answer below was not sent)
					// may be in the log: say so, add none.
					ev.outcomeUnknown = true
					writeProblem(w, r, http.StatusServiceUnavailable, ProbOutcomeUnknown, "the store did not say whether this request's audit record was written, so the request's answer is withheld; retry")
					return false
				}
				writeProblem(w, r, http.StatusServiceUnavailable, ProbUnavailable, "the audit log cannot record this request, so it was not carried out; retry later")
				return false
			}
			return true
		}
		bw.commit = record
		s.serveRecovered(bw, r, next)
		if bw.stream && bw.committed {
			if !bw.refused && s.opts.Stream != nil {
				s.opts.Stream.Emit(rec.Encode())
			}
			return // already answered, record first
		}
		if bw.status == 0 {
			bw.status = http.StatusOK
		}
		if rec.Committed && s.opts.Metrics != nil {
			s.opts.Metrics.Audited(nil) // with the change, in its transaction
		}
		if ev.outcomeUnknown && !rec.Committed {
			// The change's record is in the log exactly if the change
			// was made: none is added for this answer.
			s.log.Error("outcome unknown: the request's change and record may or may not have committed", "request_id", ev.id)
			w.WriteHeader(bw.status)
			_, _ = w.Write(bw.body.Bytes())
			return
		}
		if !rec.Committed && !record(bw.status, bw.body.Len()) {
			return
		}
		if s.opts.Stream != nil {
			s.opts.Stream.Emit(rec.Encode())
		}
		w.WriteHeader(bw.status)
		_, _ = w.Write(bw.body.Bytes())
	})
}

// serveRecovered runs next; a panic becomes a 500 answer (and its record)
// instead of a lost record.
func (s *Server) serveRecovered(bw *bufferedWriter, r *http.Request, next http.Handler) {
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.Error("panic", "request_id", eventFrom(r).id, "panic", p, "stack", string(debug.Stack()))
			bw.status = 0
			bw.body.Reset()
			writeProblem(bw, r, http.StatusInternalServerError, ProbInternal, "")
		}
	}()
	next.ServeHTTP(bw, r)
}

// MaxAuditRecords bounds one records request.
const MaxAuditRecords = 10000

func queryUint(r *http.Request, name string) (uint64, error) {
	v := r.URL.Query().Get(name)
	n, err := strconv.ParseUint(v, 10, 63)
	if err != nil {
		return 0, kms.Errorf(kms.KindInvalid, "query parameter %s must be a non-negative number", name)
	}
	return n, nil
}

func (s *Server) auditCheckpoint(w http.ResponseWriter, r *http.Request) {
	msg, err := s.opts.Prover.Latest(r.Context())
	if err != nil {
		writeError(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(msg)
}

// TileSource reads the audit archive's resources by tlog-tiles path.
type TileSource interface {
	Get(ctx context.Context, path string) ([]byte, error)
}

// auditTile serves the archive as the tlog-tiles spec lays it out: the
// checkpoint (mutable, not cached), tiles and entry bundles (immutable:
// each path names its width). Only a path in the spec's grammar reaches
// the archive.
func (s *Server) auditTile(w http.ResponseWriter, r *http.Request) {
	if s.opts.Tiles == nil {
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "kmsd keeps no audit archive (--audit-archive)")
		return
	}
	res, err := layout.Parse(chi.URLParam(r, "*"))
	if err != nil {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "not a tlog-tiles path: checkpoint, tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>] (c2sp.org/tlog-tiles)")
		return
	}
	b, err := s.opts.Tiles.Get(r.Context(), res.Path())
	if err != nil {
		if errors.Is(err, kms.ErrNotFound) {
			writeProblem(w, r, http.StatusNotFound, ProbNotFound, "the archive holds no "+res.Path()+" (not archived yet, or beyond the log)")
			return
		}
		writeError(w, r, kms.Wrap(kms.KindUnavailable, "audit archive", err))
		return
	}
	if res.Checkpoint {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
	} else {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

func (s *Server) auditRecords(w http.ResponseWriter, r *http.Request) {
	start, end, ok := queryPair(w, r, "start", "end")
	if !ok {
		return
	}
	if end < start || end-start > MaxAuditRecords {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, fmt.Sprintf("need start <= end and at most %d records per request", MaxAuditRecords))
		return
	}
	recs, err := s.opts.Audit.AuditRecords(r.Context(), start, end)
	if err != nil {
		writeError(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/jsonl")
	w.WriteHeader(http.StatusOK)
	for _, b := range recs {
		_, _ = w.Write(b)
		_, _ = w.Write([]byte{'\n'})
	}
}

// ProofResponse is the body of the proof endpoints.
type ProofResponse struct {
	Index *uint64  `json:"index,omitempty"`
	Old   *uint64  `json:"old,omitempty"`
	Size  uint64   `json:"size"`
	Proof [][]byte `json:"proof"`
}

func proofBody(p [][32]byte) [][]byte {
	out := make([][]byte, len(p))
	for i := range p {
		out[i] = p[i][:]
	}
	return out
}

// queryPair parses two required non-negative query parameters.
func queryPair(w http.ResponseWriter, r *http.Request, a, b string) (uint64, uint64, bool) {
	x, err := queryUint(r, a)
	if err == nil {
		var y uint64
		if y, err = queryUint(r, b); err == nil {
			return x, y, true
		}
	}
	writeError(w, r, err)
	return 0, 0, false
}

func (s *Server) auditInclusion(w http.ResponseWriter, r *http.Request) {
	index, size, ok := queryPair(w, r, "index", "size")
	if !ok {
		return
	}
	p, err := s.opts.Prover.InclusionProof(r.Context(), index, size)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, ProofResponse{Index: &index, Size: size, Proof: proofBody(p)})
}

func (s *Server) auditConsistency(w http.ResponseWriter, r *http.Request) {
	old, size, ok := queryPair(w, r, "old", "size")
	if !ok {
		return
	}
	p, err := s.opts.Prover.ConsistencyProof(r.Context(), old, size)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, ProofResponse{Old: &old, Size: size, Proof: proofBody(p)})
}

// clipField bounds one recorded string.
func clipField(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// capRecord bounds every string of a request's record, whatever a client
// sent: no field costs more than a fixed size in every record.
func capRecord(rec *kms.AuditRecord) {
	rec.Operation = clipField(rec.Operation, 160)
	rec.Key = clipField(rec.Key, 64)
	rec.Actor = clipField(rec.Actor, 32)
	rec.Role = clipField(rec.Role, 16)
	rec.Source = clipField(rec.Source, 64)
	rec.Problem = clipField(rec.Problem, 48)
	rec.RequestID = clipField(rec.RequestID, 32)
	rec.Token = clipField(rec.Token, 32)
}
