// Command kmsctl is the administrator's and worker's command line for kmsd.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

// Exit codes scripts can rely on.
const (
	exitOK       = 0
	exitInvalid  = 1 // verify: the signature is not valid; audit verify: the log is not intact
	exitUsage    = 2 // bad command line
	exitRefused  = 3 // the server refused the request (4xx)
	exitFailure  = 4 // the server failed (5xx) or could not be reached
	defaultAddr  = "https://127.0.0.1:8420"
	helpExitText = `Exit codes: 0 success; 1 verify found the signature invalid, or audit verify
found the log not intact; 2 usage error; 3 the server refused the request (4xx:
bad input, not found, not allowed, wrong state); 4 the server failed (5xx) or
could not be reached.`
)

type env struct {
	ctx    context.Context
	c      *client.Client
	stdout io.Writer
	stderr io.Writer
}

type command struct {
	name     string // "keys create"
	synopsis string // arguments
	help     string
	flags    func(fs *flag.FlagSet) // optional
	nargs    int                    // positional arguments
	run      func(e *env, fs *flag.FlagSet, args []string) (int, error)
}

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

func usage(w io.Writer) {
	fmt.Fprintf(w, `kmsctl: command line for kmsd, the post-quantum key management service.

Usage: kmsctl [global flags] <command> [arguments] [flags]

Global flags:
  --addr URL        server (env KMS_ADDR, default %s)
  --token TOKEN     bearer token (env KMS_TOKEN)
  --token-file F    file holding the bearer token (env KMS_TOKEN_FILE), e.g. <data-dir>/admin.token
  --timeout D       request timeout (default 60s)
  --ca-cert F       CA certificate (PEM) to trust for https (env KMS_CACERT); for
                    the embedded default: <data-dir>/tls/ca.pem. Empty: system roots
  --client-cert F   client certificate (PEM) for mutual TLS (env KMS_CLIENT_CERT)
  --client-key F    its private key (env KMS_CLIENT_KEY)

Commands:
`, defaultAddr)
	for _, c := range commands {
		fmt.Fprintf(w, "  %s\n      %s\n", strings.TrimSpace(c.name+" "+c.synopsis), c.help)
	}
	fmt.Fprintf(w, "\nRun 'kmsctl <command> --help' for a command's flags. Binary values on the\ncommand line are standard base64; output is JSON.\n\n%s\n", helpExitText)
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	gfs := flag.NewFlagSet("kmsctl", flag.ContinueOnError)
	gfs.SetOutput(io.Discard)
	addr := gfs.String("addr", orDefault(getenv("KMS_ADDR"), defaultAddr), "")
	token := gfs.String("token", getenv("KMS_TOKEN"), "")
	tokenFile := gfs.String("token-file", getenv("KMS_TOKEN_FILE"), "")
	timeout := gfs.Duration("timeout", 60*time.Second, "")
	caCert := gfs.String("ca-cert", getenv("KMS_CACERT"), "")
	clientCert := gfs.String("client-cert", getenv("KMS_CLIENT_CERT"), "")
	clientKey := gfs.String("client-key", getenv("KMS_CLIENT_KEY"), "")
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(stdout)
			return exitOK
		}
		fmt.Fprintf(stderr, "kmsctl: %v\n\n", err)
		usage(stderr)
		return exitUsage
	}
	rest := gfs.Args()
	if len(rest) == 0 || rest[0] == "help" {
		usage(stdout)
		if len(rest) == 0 {
			return exitUsage
		}
		return exitOK
	}
	cmd, rest := findCommand(rest)
	if cmd == nil {
		fmt.Fprintf(stderr, "kmsctl: unknown command %q\n\n", strings.Join(args[len(args)-len(gfs.Args()):], " "))
		usage(stderr)
		return exitUsage
	}
	fs := flag.NewFlagSet("kmsctl "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {} // printed below, to stdout for --help
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	pos, err := parseInterleaved(fs, rest)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: kmsctl %s\n  %s\n", strings.TrimSpace(cmd.name+" "+cmd.synopsis), cmd.help)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return exitOK
	}
	if err == nil && len(pos) != cmd.nargs {
		err = fmt.Errorf("%s takes %d argument(s): %s", cmd.name, cmd.nargs, cmd.synopsis)
	}
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: %v\n", err)
		return exitUsage
	}
	tok := *token
	if tok == "" && *tokenFile != "" {
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			fmt.Fprintf(stderr, "kmsctl: token file: %v\n", err)
			return exitUsage
		}
		tok = strings.TrimSpace(string(b))
	}
	tlsCfg, err := client.TLSConfig(*caCert, *clientCert, *clientKey)
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: %v\n", err)
		return exitUsage
	}
	c, err := client.New(*addr, tok, client.WithTLS(tlsCfg))
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: %v\n", err)
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	code, err := cmd.run(&env{ctx: ctx, c: c, stdout: stdout, stderr: stderr}, fs, pos)
	if err != nil {
		var ue usageError
		switch {
		case errors.As(err, &ue):
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			return exitUsage
		case client.StatusOf(err) >= 400 && client.StatusOf(err) < 500:
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			return exitRefused
		default:
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			return exitFailure
		}
	}
	return code
}

type usageError struct{ msg string }

func (u usageError) Error() string { return u.msg }

func orDefault(v, d string) string {
	if v == "" {
		return d
	}
	return v
}

// findCommand matches the longest command name at the start of args.
func findCommand(args []string) (*command, []string) {
	for n := 2; n >= 1; n-- {
		if len(args) < n {
			continue
		}
		name := strings.Join(args[:n], " ")
		for i := range commands {
			if commands[i].name == name {
				return &commands[i], args[n:]
			}
		}
	}
	return nil, nil
}

// parseInterleaved lets flags come before, between or after positional
// arguments.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func parseVersion(s string, allowPrimary bool) (uint64, error) {
	if allowPrimary && s == "primary" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 {
		if allowPrimary {
			return 0, usageError{fmt.Sprintf("version %q must be a positive number or \"primary\"", s)}
		}
		return 0, usageError{fmt.Sprintf("version %q must be a positive number", s)}
	}
	return n, nil
}

// binaryInput reads a value given as base64 text, or raw from a file (- for
// stdin).
func binaryInput(b64, file, what string) ([]byte, error) {
	switch {
	case b64 != "" && file != "":
		return nil, usageError{fmt.Sprintf("give --%s or --%s-file, not both", what, what)}
	case file == "-":
		return io.ReadAll(os.Stdin)
	case file != "":
		return os.ReadFile(file)
	case b64 != "":
		b, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, usageError{fmt.Sprintf("--%s is not standard base64", what)}
		}
		return b, nil
	}
	return nil, nil
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
