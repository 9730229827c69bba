package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// TokenFunc returns the bearer token for a request. refresh asks for a new
// one (the last was rejected with 401).
type TokenFunc func(ctx context.Context, refresh bool) (string, error)

// Client talks to the registry on behalf of one party.
type Client struct {
	Base  *url.URL
	Study string
	PID   int
	Token TokenFunc
	// HTTP is the client used; nil means http.DefaultClient.
	HTTP *http.Client
}

// StatusError is a non-success answer from the registry.
type StatusError struct {
	Code int
	Msg  string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("registry answered %d %s: %s", e.Code, http.StatusText(e.Code), e.Msg)
}

// Publish writes this party's entry.
func (c *Client) Publish(ctx context.Context, e Entry) error {
	e.PID = c.PID
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	_, err = c.do(ctx, http.MethodPut, c.partyPath(), b)
	return err
}

// Delete removes this party's entry.
func (c *Client) Delete(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodDelete, c.partyPath(), nil)
	return err
}

// List fetches the study's entries. With wait > 0 the server holds the
// request until the version passes after, or wait elapses.
func (c *Client) List(ctx context.Context, after uint64, wait time.Duration) (List, error) {
	p := c.studyPath() + "/parties"
	if wait > 0 {
		p += "?" + url.Values{"after": {strconv.FormatUint(after, 10)}, "wait": {wait.String()}}.Encode()
	}
	b, err := c.do(ctx, http.MethodGet, p, nil)
	if err != nil {
		return List{}, err
	}
	var l List
	if err := json.Unmarshal(b, &l); err != nil {
		return List{}, fmt.Errorf("registry list: bad json: %w", err)
	}
	return l, nil
}

func (c *Client) studyPath() string { return "v1/studies/" + url.PathEscape(c.Study) }
func (c *Client) partyPath() string {
	return c.studyPath() + "/parties/" + strconv.Itoa(c.PID)
}

// do sends one request; a 401 gets one retry with a refreshed token.
func (c *Client) do(ctx context.Context, method, path string, body []byte) ([]byte, error) {
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	// The API lives below the base URL's path: https://host/api means
	// https://host/api/v1/…, with or without a final slash.
	base := *c.Base
	if !strings.HasSuffix(base.Path, "/") {
		base.Path += "/"
	}
	ref, err := url.Parse(path)
	if err != nil {
		return nil, err
	}
	u := base.ResolveReference(ref)
	for attempt := 0; ; attempt++ {
		tok, err := c.Token(ctx, attempt > 0)
		if err != nil {
			return nil, fmt.Errorf("registry credential: %w", err)
		}
		req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := hc.Do(req)
		if err != nil {
			return nil, err
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("registry %s: %w", method, err)
		}
		if resp.StatusCode/100 == 2 {
			return b, nil
		}
		if resp.StatusCode == http.StatusUnauthorized && attempt == 0 {
			continue
		}
		var eb struct {
			Error string `json:"error"`
		}
		msg := string(bytes.TrimSpace(b))
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			msg = eb.Error
		}
		if len(msg) > 200 {
			msg = msg[:200]
		}
		return nil, &StatusError{Code: resp.StatusCode, Msg: msg}
	}
}
