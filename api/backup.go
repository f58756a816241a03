package api

import (
	"context"
	"io"
	"net/http"

	"github.com/kmsd-project/kmsd/kms"
)

// BackupFunc writes a backup to w and returns its id.
type BackupFunc func(ctx context.Context, w io.Writer, withBlobs bool) (id string, err error)

// BackupIDTrailer is the HTTP trailer that carries a backup's id once it
// is complete.
const BackupIDTrailer = "Kmsd-Backup-Id"

// backup streams a backup of everything (admin over "*"). Its record
// commits before the first byte, so the backup holds its own record; an
// error after that cuts the connection, and the file, without its
// trailer, is refused by every reader.
func (s *Server) backup(w http.ResponseWriter, r *http.Request) {
	ev := eventFrom(r)
	if err := ev.principal.AuthorizeAll("take a backup"); err != nil {
		writeError(w, r, err)
		return
	}
	if s.opts.Backup == nil {
		writeError(w, r, kms.Errorf(kms.KindUnavailable, "this kmsd takes no backup"))
		return
	}
	withBlobs := true
	switch r.URL.Query().Get("blobs") {
	case "", "true":
	case "false":
		withBlobs = false
	default:
		writeError(w, r, kms.Errorf(kms.KindInvalid, "query parameter blobs must be true or false"))
		return
	}
	streamAudited(w)
	w.Header().Set("Content-Type", "application/vnd.kmsd.backup")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Trailer", BackupIDTrailer)
	w.WriteHeader(http.StatusOK)
	if b, ok := w.(*bufferedWriter); ok && b.refused {
		return
	}
	id, err := s.opts.Backup(r.Context(), w, withBlobs)
	if err != nil {
		s.log.Error("backup failed; the connection is cut so the file stays without its trailer", "request_id", ev.id, "err", err)
		panic(http.ErrAbortHandler)
	}
	w.Header().Set(BackupIDTrailer, id)
}
